"""Prompt/response records for causal-LM instruction tuning, from a packaged corpus, a file or the Hub.

`load_instructions` turns a spec into an :class:`InstructionData`: a dataset with columns ``prompt``,
``response`` (the training target), ``reference`` (what a generation is scored against), ``tests`` (code
tasks: the program run after the candidate; empty otherwise) and ``label`` (a ClassLabel used only to
partition: the sentiment for the tweets task, the ``--label-column`` of a file if it has one, else one label
``all``), and the scoring that fits it (``exact``, ``number`` or ``pass@1``, see :mod:`fedlora.generation`).

Specs:
- ``tweets`` (offline default): the tweet corpus rendered as instructions ("Classify the sentiment of this
  tweet as negative, neutral or positive. …") with the label word as the answer; exact match.
- ``gsm8k``, ``hf:openai/gsm8k:main``: grade-school maths; the response is the worked solution (calculator
  annotations removed), the reference the number after ``####``; scored by the last number.
- ``mbpp``, ``hf:google-research-datasets/mbpp[:full|sanitized]``: Python tasks with assert-tests; pass@1.
- ``humaneval``, ``hf:openai/openai_humaneval``: HumanEval (function signature + docstring, ``check`` tests);
  the response is the whole function; pass@1.
- a ``.jsonl``/``.json``/``.csv`` file (or ``jsonl:PATH``…) or any other ``hf:NAME[:CONFIG]``: records with a
  prompt and a response column (``--prompt-column``/``--response-column``, default ``prompt``/``response``),
  optionally ``answer`` (the reference; default the response) and ``tests`` (a program; makes it pass@1).
Front end: imports nothing from aggregation, adapters or federation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import datasets
import numpy as np
import pandas as pd

from .sampling import int_column, stratified_choice
from .sources import DataError, LabelledText, _encode, _file_spec, _read_file, _tweets

AUTO_SCORING = "auto"
_ALIASES = {  # short name → (hub name, config)
    "gsm8k": ("openai/gsm8k", "main"),
    "mbpp": ("google-research-datasets/mbpp", "full"),
    "humaneval": ("openai/openai_humaneval", None),
}
_KINDS = {"gsm8k": "gsm8k", "mbpp": "mbpp", "openai_humaneval": "humaneval", "humaneval": "humaneval"}
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass
class InstructionData(LabelledText):
    """Prompt/response records (see the module doc for the columns) and how generations are scored."""

    scoring: str = "exact"


def load_instructions(
    spec: str,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_column: str = "label",
    scoring: str = AUTO_SCORING,
    seed: int = 0,
    limit: int | None = None,
) -> InstructionData:
    """Load ``spec`` (see the module doc). ``scoring`` ``auto`` picks the data set's own; ``limit`` keeps a
    seeded subsample of that many rows, stratified by the partition label."""
    if limit is not None and limit < 2:
        raise DataError(f"limit={limit} leaves too few examples; pass a limit of at least 2 or None")
    if spec == "tweets":
        records, name, natural = tweets_as_instructions(), "tweets (as instructions)", "exact"
    elif spec == "bbc":
        raise DataError("'bbc' is a classification corpus only; for --task causal-lm pass tweets, gsm8k, mbpp, humaneval, a .jsonl file or hf:NAME")
    elif (file := _file_spec(spec)) is not None:
        records, natural = _generic(_read_file(*file), file[0].name, prompt_column, response_column, label_column)
        name = file[0].name
    else:
        if spec in _ALIASES:
            hub, config = _ALIASES[spec]
        else:
            hub, _, config = spec.removeprefix("hf:").partition(":")
            config = config or None
        kind = _KINDS.get(hub.rsplit("/", 1)[-1].lower())
        if kind == "gsm8k" and config is None:
            config = "main"
        frame, name = _hub(hub, config, kind)
        if kind == "gsm8k":
            records, natural = gsm8k_records(frame, name), "number"
        elif kind == "mbpp":
            records, natural = mbpp_records(frame, name), "pass@1"
        elif kind == "humaneval":
            records, natural = humaneval_records(frame, name), "pass@1"
        else:
            records, natural = _generic(frame, name, prompt_column, response_column, label_column)
    chosen = natural if scoring == AUTO_SCORING else scoring
    if chosen == "pass@1" and not (records["tests"].str.strip() != "").all():
        raise DataError(f"--scoring pass@1 needs tests for every example and '{name}' has rows without; add a 'tests' column or pass --scoring exact")
    data = _to_dataset(records, name, chosen)
    if limit is not None and limit < len(data):
        keep = stratified_choice(int_column(data.dataset, "label"), limit, np.random.default_rng(seed))
        data.dataset = data.dataset.select(keep)
    return data


# ---- the offline task ------------------------------------------------------------------------------------------
def tweets_as_instructions() -> pd.DataFrame:
    """The tweet corpus as instructions: "Classify the sentiment …" → the label word (negative/neutral/positive)."""
    frame = _tweets()
    names = sorted(frame["label"].astype(str).str.strip().unique())
    choices = ", ".join(names[:-1]) + f" or {names[-1]}"
    instruction = f"Classify the sentiment of this tweet as {choices}. Answer with one word."
    text = frame["text"].astype(str).str.strip()
    label = frame["label"].astype(str).str.strip()
    return pd.DataFrame({
        "prompt": instruction + "\n\nTweet: " + text, "response": label, "reference": label, "tests": "", "label": label,
    })


# ---- named data sets ------------------------------------------------------------------------------------------
def gsm8k_records(frame: pd.DataFrame, name: str = "gsm8k") -> pd.DataFrame:
    """GSM8K (question, answer): the response is the solution without ``<<…>>`` annotations; the reference is
    the number after ``####``."""
    from fedlora.generation import gsm8k_reference

    _require(frame, name, ("question", "answer"))
    answers = frame["answer"].astype(str)
    return pd.DataFrame({
        "prompt": frame["question"].astype(str).str.strip(),
        "response": answers.map(lambda a: _CALCULATOR.sub("", a).strip()),
        "reference": answers.map(gsm8k_reference),
        "tests": "", "label": "all",
    })


def mbpp_records(frame: pd.DataFrame, name: str = "mbpp") -> pd.DataFrame:
    """MBPP (``full``: text, code, test_list, test_setup_code; ``sanitized``: prompt, code, test_list,
    test_imports). The prompt shows the task and its first test (so the function name is known)."""
    text_col = "text" if "text" in frame.columns else "prompt"
    _require(frame, name, (text_col, "code", "test_list"))

    def tests(row) -> str:
        setup = row.get("test_setup_code") or ""
        imports = row.get("test_imports")
        imports = "\n".join(imports) if imports is not None and len(imports) else ""
        return "\n".join(x for x in (imports, setup, "\n".join(row["test_list"])) if x.strip()) + "\n"

    rows = frame.to_dict("records")
    return pd.DataFrame({
        "prompt": [f"{r[text_col].strip()}\nWrite a Python function that passes this test:\n{list(r['test_list'])[0]}" for r in rows],
        "response": [str(r["code"]).replace("\r\n", "\n").strip() for r in rows],
        "reference": [str(r["code"]).replace("\r\n", "\n").strip() for r in rows],
        "tests": [tests(r) for r in rows],
        "label": "all",
    })


def humaneval_records(frame: pd.DataFrame, name: str = "humaneval") -> pd.DataFrame:
    """HumanEval (prompt, canonical_solution, test, entry_point): complete the function; tests call ``check``."""
    _require(frame, name, ("prompt", "canonical_solution", "test", "entry_point"))
    rows = frame.to_dict("records")
    return pd.DataFrame({
        "prompt": [f"Complete this Python function:\n{r['prompt']}" for r in rows],
        "response": [(r["prompt"] + r["canonical_solution"]).strip() for r in rows],
        "reference": [(r["prompt"] + r["canonical_solution"]).strip() for r in rows],
        "tests": [f"{r['test']}\n\ncheck({r['entry_point']})\n" for r in rows],
        "label": "all",
    })


def require_fields(frame: pd.DataFrame, name: str, prompt_column: str, response_column: str) -> None:
    """One line naming the missing prompt or response field, the fields there are, and the flag that picks another."""
    for column, flag in ((prompt_column, "--prompt-column"), (response_column, "--response-column")):
        if column not in frame.columns:
            listing = ", ".join(str(c) for c in frame.columns)
            raise DataError(f"'{name}' has no {flag.removeprefix('--').removesuffix('-column')} field '{column}' (fields: {listing}); pass {flag} NAME")


def _generic(frame: pd.DataFrame, name: str, prompt_column: str, response_column: str, label_column: str) -> tuple[pd.DataFrame, str]:
    require_fields(frame, name, prompt_column, response_column)
    response = frame[response_column].astype(str)
    has_tests = "tests" in frame.columns
    records = pd.DataFrame({
        "prompt": frame[prompt_column].astype(str),
        "response": response,
        "reference": frame["answer"].astype(str) if "answer" in frame.columns else response,
        "tests": frame["tests"].fillna("").astype(str) if has_tests else "",
        "label": frame[label_column].astype(str) if label_column in frame.columns else "all",
    })
    return records, ("pass@1" if has_tests else "exact")


def _require(frame: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"'{name}' lacks field(s) {', '.join(missing)} (fields: {', '.join(map(str, frame.columns))}); check the data set name and config")


def _hub(name: str, config: str | None, kind: str | None) -> tuple[pd.DataFrame, str]:
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:  # connection, not found, bad config: all mean the same to the user
        raise DataError(
            f"could not load '{name}{':' + config if config else ''}' from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the name and network, or pass tweets or a local .jsonl file"
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return loaded.to_pandas(), name
    # GSM8K and generic sets: the train split; the small code sets: every split (HumanEval has only "test").
    if "train" in loaded and kind not in ("mbpp", "humaneval"):
        return loaded["train"].to_pandas(), f"{name}[train]"
    splits = [s for s in loaded if s != "prompt"] or list(loaded)  # MBPP's "prompt" split is few-shot examples
    return pd.concat([loaded[s].to_pandas() for s in splits], ignore_index=True), f"{name}[{'+'.join(splits)}]"


def _to_dataset(records: pd.DataFrame, name: str, scoring: str) -> InstructionData:
    """Drop rows with an empty prompt or response and repeated prompts; labels become 0..C-1."""
    records = records.copy()
    records["prompt"] = records["prompt"].fillna("").astype(str).str.strip()
    records["response"] = records["response"].fillna("").astype(str).str.strip()
    keep = (records["prompt"] != "") & (records["response"] != "")
    records = records[keep]
    # A prompt seen with two different responses is dropped altogether (so it cannot sit on both sides of a split).
    conflicting = records.groupby("prompt")["response"].transform("nunique") > 1
    records = records[~conflicting].drop_duplicates("prompt")
    if len(records) < 2:
        raise DataError(f"'{name}' has fewer than 2 records with a non-empty prompt and response; check its contents and --prompt-column/--response-column")
    codes, names = _encode(records["label"].tolist())
    features = datasets.Features({
        "prompt": datasets.Value("string"), "response": datasets.Value("string"), "reference": datasets.Value("string"),
        "tests": datasets.Value("string"), "label": datasets.ClassLabel(names=names),
    })
    ds = datasets.Dataset.from_dict({
        "prompt": records["prompt"].tolist(), "response": records["response"].tolist(),
        "reference": records["reference"].fillna("").astype(str).tolist(), "tests": records["tests"].astype(str).tolist(),
        "label": codes.tolist(),
    }, features=features)
    return InstructionData(dataset=ds, label_names=list(names), name=name, scoring=scoring)
