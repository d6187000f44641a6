"""Instruction data for ``--task instruct``: prompt/response records from several tasks, kept with the natural
attributes (task, category, subject, source, language, user) that ``--split-by`` partitions over.

`load_instruct` turns a spec into an :class:`~fedlora.data.instructions.InstructionData` whose dataset has the
columns ``prompt``, ``response`` (the training target), ``references`` (every accepted answer), ``rule`` (how a
generation is scored: ``prefix``, ``includes``, ``includes_nocase``, ``fuzzy`` as OpenAI Evals defines them, ``exact``,
``number`` or ``choice``; :mod:`fedlora.generation.rules`), ``task`` and every attribute column the source has; and
``label``, the ``task`` (or the ``--split-by`` field) as a ClassLabel, so that the label partitions and the global
test set's stratification follow the tasks.

Specs:
- ``evals:NAME[,NAME…]``: tasks of OpenAI Evals' registry by their registry names (``evals:quartz,logiqa``,
  ``evals:theory_of_mind.socialiqa``), read from the ``evals`` wheel (:mod:`fedlora.data.evals_registry`); each task is
  scored by its registry entry's rule.
- ``alpaca-gpt4``: Alpaca-GPT4 from the Hub (FlowerTune's general-NLP data), one task.
- ``dolly``: Databricks' Dolly-15k from the Hub (``category`` as the attribute; FedIT's, FLoRA's and FLoRIST's
  split), the context appended to the instruction.
- a ``.jsonl``/``.json``/``.csv`` file or ``hf:NAME[:CONFIG]``: records with ``--prompt-column`` and
  ``--response-column``; ``task`` from a ``task`` column if there is one, else the file's name; ``rule`` from a
  ``rule`` column, else ``exact``; every other column is an attribute ``--split-by`` may name.
Front end of the data layer: imports nothing from aggregation, adapters or federation.
"""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd

from .instructions import InstructionData, _hub, require_fields
from .sources import DataError, _encode, _file_spec, _read_file

DOLLY = ("databricks/databricks-dolly-15k", None)
ALPACA_GPT4 = ("vicgalle/alpaca-gpt4", None)
_KEPT = ("prompt", "response", "references", "rule", "task")


def load_instruct(spec: str, *, prompt_column: str = "prompt", response_column: str = "response", split_by: str = "task",
                  seed: int = 0, limit_per_task: int | None = None) -> InstructionData:
    """Load ``spec`` (see the module doc) with ``split_by`` as the partition label; ``limit_per_task`` keeps a seeded
    subset of that many rows per task."""
    if spec.startswith("evals:"):
        from .evals_registry import load_evals

        frame = load_evals(spec.removeprefix("evals:"), limit_per_task=limit_per_task, seed=seed)
        records, name = _from_evals(frame), spec
    elif spec == "dolly":
        records, name = _dolly(_hub(*DOLLY, None)[0]), "dolly"
    elif spec == "alpaca-gpt4":
        records, name = _alpaca(_hub(*ALPACA_GPT4, None)[0]), "alpaca-gpt4"
    elif (file := _file_spec(spec)) is not None:
        records, name = _generic(_read_file(*file), file[0].stem, prompt_column, response_column), file[0].name
    elif spec.startswith("hf:"):
        hub, _, config = spec.removeprefix("hf:").partition(":")
        records, name = _generic(_hub(hub, config or None, None)[0], hub.rsplit("/", 1)[-1], prompt_column, response_column), spec
    else:
        raise DataError(f"--data {spec!r} is not instruction data; pass evals:NAME[,NAME…] (OpenAI Evals tasks), dolly, "
                        "a .jsonl/.csv file with prompt and response fields, or hf:NAME")
    if limit_per_task is not None and not spec.startswith("evals:"):
        records = records.groupby("task", sort=False, group_keys=False).apply(
            lambda g: g.sample(n=min(limit_per_task, len(g)), random_state=seed))
    return _to_dataset(records, name, split_by)


def _from_evals(frame: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "prompt": frame["prompt"], "response": frame["response"], "references": frame["references"],
        "rule": frame["scoring"], "task": frame["task"],
    })
    for column in ("language", "source"):
        out[column] = frame[column]
    return out


def _dolly(frame: pd.DataFrame) -> pd.DataFrame:
    context = frame["context"].fillna("").astype(str).str.strip()
    prompt = frame["instruction"].astype(str).str.strip() + np.where(context != "", "\n\n" + context, "")
    return pd.DataFrame({"prompt": prompt, "response": frame["response"].astype(str), "references": frame["response"].map(lambda r: [str(r)]),
                         "rule": "exact", "task": frame["category"].astype(str), "category": frame["category"].astype(str),
                         "source": "dolly"})


def _alpaca(frame: pd.DataFrame) -> pd.DataFrame:
    """Alpaca-GPT4 (FlowerTune's general-NLP data): the instruction with its input, the GPT-4 output; one task."""
    extra = frame["input"].fillna("").astype(str).str.strip()
    prompt = frame["instruction"].astype(str).str.strip() + np.where(extra != "", "\n\n" + extra, "")
    return pd.DataFrame({"prompt": prompt, "response": frame["output"].astype(str), "references": frame["output"].map(lambda r: [str(r)]),
                         "rule": "exact", "task": "alpaca-gpt4", "source": "alpaca-gpt4"})


def _generic(frame: pd.DataFrame, name: str, prompt_column: str, response_column: str) -> pd.DataFrame:
    require_fields(frame, name, prompt_column, response_column)
    out = pd.DataFrame({"prompt": frame[prompt_column].astype(str), "response": frame[response_column].astype(str)})
    answers = frame["answer"] if "answer" in frame.columns else frame[response_column]
    out["references"] = answers.map(lambda a: [str(x) for x in a] if isinstance(a, list | tuple | np.ndarray) else [str(a)])
    out["rule"] = frame["rule"].astype(str) if "rule" in frame.columns else "exact"
    out["task"] = frame["task"].astype(str) if "task" in frame.columns else name
    for column in frame.columns:
        if column not in (prompt_column, response_column, "answer", "rule", "task", *_KEPT) and _is_attribute(frame[column]):
            out[str(column)] = frame[column].astype(str)
    return out


def _is_attribute(column: pd.Series) -> bool:
    """A column of plain values (not lists or dicts) that could label rows: an attribute ``--split-by`` may name."""
    return not column.map(lambda v: isinstance(v, list | dict | tuple | np.ndarray)).any()


def _to_dataset(records: pd.DataFrame, name: str, split_by: str) -> InstructionData:
    """Drop empty and repeated prompts; the ``split_by`` attribute becomes the label."""
    from fedlora.generation.rules import RULES

    records = records.copy()
    for column in ("prompt", "response"):
        records[column] = records[column].fillna("").astype(str).str.strip()
    records = records[(records["prompt"] != "") & (records["response"] != "")]
    records = records[~(records.groupby("prompt")["response"].transform("nunique") > 1)].drop_duplicates("prompt")
    if len(records) < 2:
        raise DataError(f"'{name}' has fewer than 2 records with a non-empty prompt and response; check its contents and "
                        "--prompt-column/--response-column")
    unknown = sorted(set(records["rule"]) - set(RULES))
    if unknown:
        raise DataError(f"'{name}' names answer rule(s) {', '.join(unknown)}; use one of {', '.join(RULES)} in its rule field")
    attributes = [c for c in records.columns if c not in ("prompt", "response", "references", "rule", "reference", "tests", "label")]
    if split_by not in attributes:
        raise DataError(f"--split-by {split_by!r} is not a field of '{name}'; its fields are {', '.join(attributes)}")
    codes, names = _encode(records[split_by].astype(str).tolist())
    columns = {c: records[c].tolist() for c in ("prompt", "response", "references", "rule", *attributes)}
    columns["reference"] = [refs[0] for refs in columns["references"]]
    columns["tests"] = [""] * len(records)
    features = datasets.Features({
        **{c: datasets.Value("string") for c in ("prompt", "response", "rule", "reference", "tests", *attributes)},
        "references": datasets.Sequence(datasets.Value("string")), "label": datasets.ClassLabel(names=names),
    })
    columns["references"] = [[str(r) for r in refs] for refs in columns["references"]]
    ds = datasets.Dataset.from_dict(columns | {"label": codes.tolist()}, features=features)
    return InstructionData(dataset=ds, label_names=list(names), name=name, scoring="auto")
