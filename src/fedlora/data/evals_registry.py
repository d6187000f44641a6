"""OpenAI Evals' registry as instruction data: ``evals:NAME[,NAME…]`` read from the cached ``evals`` wheel.

The registry's ``evals/registry/evals/*.yaml`` name each eval: a top-level key (``quartz``) whose ``id`` points
to a versioned entry (``quartz.test.v1``) holding the eval ``class`` and its ``args`` (``samples_jsonl`` under
``evals/registry/data/``, optionally ``few_shot_jsonl``/``num_few_shot``, ``task_description``, ``n_samples``);
entries with a class that no ``id`` points to (``theory_of_mind.socialiqa``) are tasks of their own. A task is
asked for by any of these names; versioned names resolve to their top-level task.

Loadable tasks are those whose class has an answer rule in :mod:`fedlora.generation` (`SCORING_OF_CLASS`):
``Match`` and ``MatchWithSolvers`` → ``prefix``, ``Includes`` → ``includes`` (``includes_nocase`` with
``ignore_case``), ``FuzzyMatch`` → ``fuzzy``. Model-graded evals, Hub-backed multiple choice, BLEU-scored
translation and the agent/game/tool/image evals are listed with the reason they cannot be used.

Excluded for their licence (`EXCLUDED_DATA`; the wheel's ``LICENSE.md`` lists per-dataset licences): ToMi
(``theory_of_mind/tomi``, CC BY-NC 4.0: the tasks ``theory_of_mind``, ``theory_of_mind.tomi``,
``theory_of_mind.tomi_light``) and Steganography (``steganography``, CC BY-NC components). The other datasets
the notes list (Text Compression, Schelling Point, Ballots, Sandbagging, Already Said That) are commercial-use
licences and belong to evals that are not loadable anyway; SocialIQA (CC BY 4.0) is kept, and so is Hi-ToM
(``theory_of_mind.hitom*``), which the notes do not list (so the package's MIT licence covers it as shipped; its
own repository states no licence).

Records (`load_evals`): ``prompt`` (the chat messages rendered as one readable string), ``messages`` (the same
as a list of ``{"role", "content"}`` dicts, few-shot turns as user/assistant, for a chat template), ``response``
(the first ideal answer, the training target), ``reference`` (the same), ``references`` (every ideal answer, for
scoring), ``task`` (the task's name), ``scoring``, ``language`` (ISO 639-1 for the EXAMS tasks, whose name gives
the exam's language; ``und`` elsewhere) and ``source`` (``evals``).
Imports nothing from fedlora except fedlora.data.
"""

from __future__ import annotations

import difflib
import json
import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from . import archives
from .sources import DataError

log = logging.getLogger("fedlora")

REGISTRY = "evals/registry/evals/"
DATA = "evals/registry/data/"
COLUMNS = ["prompt", "messages", "response", "reference", "references", "task", "scoring", "language", "source"]
SCORING_OF_CLASS = {
    "evals.elsuite.basic.match:Match": "prefix",
    "evals.elsuite.basic.match_with_solvers:MatchWithSolvers": "prefix",
    "evals.elsuite.basic.includes:Includes": "includes",
    "evals.elsuite.basic.fuzzy_match:FuzzyMatch": "fuzzy",
}
EXCLUDED_DATA = {  # data folder → why its tasks are left out (evals' LICENSE.md, "Dataset Licenses")
    "theory_of_mind/tomi/": "ToMi is licensed CC BY-NC 4.0 (non-commercial)",
    "steganography/": "its data mixes CC BY-NC 4.0 sets (PiC/phrase_similarity, alpaca-gpt4)",
}
_UNSUPPORTED = {  # class (or its module's start) → why no answer rule fits
    "evals.elsuite.modelgraded.": "it is graded by another model",
    "evals.elsuite.multiple_choice:": "its data is on the Hugging Face Hub, not in the archive",
    "evals.elsuite.translate:": "it is scored by BLEU",
    "evals.elsuite.basic.json_match:": "it is scored by JSON equality",
}
EXAMS_LANGUAGES = {
    "albanian": "sq", "arabic": "ar", "bulgarian": "bg", "croatian": "hr", "french": "fr", "german": "de",
    "hungarian": "hu", "italian": "it", "lithuanian": "lt", "macedonian": "mk", "polish": "pl", "portuguese": "pt",
    "serbian": "sr", "spanish": "es", "turkish": "tr", "vietnamese": "vi",
}
UNDETERMINED = "und"


@dataclass(frozen=True)
class EvalTask:
    """One task of the registry (a top-level name), resolved to the entry that defines it."""

    name: str
    eval_class: str
    samples: tuple[str, ...]  # members under evals/registry/data/
    scoring: str | None  # None: not loadable (see `reason`)
    reason: str = ""  # why the task cannot be loaded; empty when it can
    few_shot: str | None = None
    num_few_shot: int = 0
    task_description: str | None = None
    n_samples: int | None = None

    @property
    def language(self) -> str:
        head, _, tail = self.name.partition("-")
        return EXAMS_LANGUAGES.get(head, UNDETERMINED) if tail == "exams-qa" else UNDETERMINED

    @property
    def loadable(self) -> bool:
        return not self.reason


def registry() -> tuple[dict[str, EvalTask], dict[str, str]]:
    """(tasks by name, every registry name → its task's name), read from the cached wheel."""
    path = archives.wheel_path("evals")
    stat = path.stat()
    return _registry(str(path), stat.st_size, stat.st_mtime_ns)


def list_tasks(*, include_unavailable: bool = False) -> pd.DataFrame:
    """The Evals tasks, largest first: ``name``, ``rows`` (non-empty lines of its samples files, capped by its
    ``n_samples``; `load_evals` skips the few without an input or ideal answer), ``scoring``, ``language``,
    ``eval_class`` (and with `include_unavailable`, every other task too, with ``reason`` saying why it cannot be
    loaded, and 0 rows when its data is not in the wheel)."""
    tasks, _ = registry()
    counts = _row_counts()
    rows = [
        {"name": t.name, "rows": _task_rows(t, counts), "scoring": t.scoring or "", "language": t.language,
         "eval_class": t.eval_class, "reason": t.reason}
        for t in tasks.values() if include_unavailable or t.loadable
    ]
    frame = pd.DataFrame(rows, columns=["name", "rows", "scoring", "language", "eval_class", "reason"])
    frame = frame.sort_values(["rows", "name"], ascending=[False, True], ignore_index=True)
    return frame if include_unavailable else frame.drop(columns="reason")


def load_evals(names: str | Iterable[str], *, limit_per_task: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The records (see the module doc) of the named tasks, in the order given; `limit_per_task` keeps a seeded
    subset of that many rows per task (the same rows whatever other tasks are asked for)."""
    if limit_per_task is not None and limit_per_task < 1:
        raise DataError(f"limit_per_task={limit_per_task} leaves tasks empty; pass 1 or more, or None for every row")
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise DataError("no Evals task named; pass evals:NAME[,NAME…], e.g. evals:quartz,logiqa (list_tasks() lists them)")
    tasks = list(dict.fromkeys(resolve(name) for name in wanted))
    frames = [_load_task(task, limit_per_task, seed) for task in tasks]
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def resolve(name: str) -> EvalTask:
    """The loadable task a registry name stands for; a one-line DataError for unknown, excluded or unusable names."""
    tasks, aliases = registry()
    if name not in aliases:
        close = difflib.get_close_matches(name, sorted(aliases), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "list_tasks() lists the loadable ones"
        raise DataError(f"'{name}' is not a task of the Evals registry; {hint}")
    task = tasks[aliases[name]]
    if not task.loadable:
        raise DataError(
            f"Evals task '{name}' cannot be used because {task.reason}; pick a task scored by Match, Includes or "
            "FuzzyMatch (list_tasks() lists them)"
        )
    return task


def render_prompt(messages: list[dict]) -> str:
    """Chat messages as one prompt: system text as is; user text as is unless there are few-shot answers, in which
    case the turns read ``User: …`` / ``Assistant: …``."""
    dialogue = any(m["role"] == "assistant" for m in messages)
    blocks: list[str] = []
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "assistant" and blocks and blocks[-1].startswith("User: "):
            blocks[-1] += f"\nAssistant: {content}"
        elif m["role"] in ("user", "assistant") and dialogue:
            blocks.append(f"{m['role'].capitalize()}: {content}")
        else:
            blocks.append(content)
    return "\n\n".join(b for b in blocks if b)


# ---- the registry --------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _registry(path: str, size: int, mtime: int) -> tuple[dict[str, EvalTask], dict[str, str]]:
    entries = _entries()
    data = set(archives.members("evals", DATA))
    pointed = {str(e["id"]): name for name, e in entries.items() if "id" in e}
    tasks, aliases = {}, {}
    for name, entry in entries.items():
        if "id" in entry:
            target = str(entry["id"])
        elif name in pointed:
            aliases[name] = pointed[name]  # a versioned entry: its top-level task is listed instead
            continue
        else:
            target = name
        tasks[name] = _task(name, entries.get(target), data)
        aliases[name] = name
    return tasks, aliases


def _entries() -> dict[str, dict]:
    try:
        import yaml
    except ImportError:
        raise DataError("reading the Evals registry needs PyYAML; pip install pyyaml") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    entries: dict[str, dict] = {}
    files = [m for m in archives.members("evals", REGISTRY) if m.endswith((".yaml", ".yml"))]
    for member, text in zip(files, archives.read_texts("evals", files)):
        try:
            parsed = yaml.load(text, Loader=loader)
        except yaml.YAMLError as err:
            log.warning("skipping %s: %s", member, str(err).splitlines()[0])
            continue
        for key, value in (parsed or {}).items():
            if isinstance(value, dict):
                entries[str(key)] = value
    return entries


def _task(name: str, entry: dict | None, data: set[str]) -> EvalTask:
    if entry is None or "class" not in entry:
        return EvalTask(name, "", (), None, "its registry entry has no eval class")
    cls, args = str(entry["class"]), entry.get("args") or {}
    files = args.get("samples_jsonl") or []
    samples = tuple(str(f) for f in ([files] if isinstance(files, str) else files))
    scoring = SCORING_OF_CLASS.get(cls)
    if scoring == "includes" and args.get("ignore_case"):
        scoring = "includes_nocase"
    few = args.get("few_shot_jsonl") if int(args.get("num_few_shot") or 0) > 0 else None
    reason = _reason(cls, scoring, samples, [few] if few else [], data)
    n = args.get("n_samples")
    return EvalTask(name, cls, samples, scoring if not reason else None, reason, few, int(args.get("num_few_shot") or 0),
                    args.get("task_description"), int(n) if n is not None else None)


def _reason(cls: str, scoring: str | None, samples: tuple[str, ...], few: list[str], data: set[str]) -> str:
    for folder, why in EXCLUDED_DATA.items():
        if any(s.startswith(folder) for s in samples):
            return why
    if scoring is None:
        why = next((w for start, w in _UNSUPPORTED.items() if cls.startswith(start)), None)
        return why or f"it is a custom eval ({cls.rpartition(':')[2] or cls}) with its own protocol"
    if not samples:
        return "it names no samples file"
    absent = [s for s in (*samples, *few) if DATA + s not in data]
    return f"its data file {absent[0]} is not in the wheel" if absent else ""


# ---- rows ----------------------------------------------------------------------------------------------------
def _load_task(task: EvalTask, limit: int | None, seed: int) -> pd.DataFrame:
    few_shot = [m for line in archives.read_lines("evals", DATA + task.few_shot)[: task.num_few_shot]
                for m in _messages(json.loads(line).get("sample", []))] if task.few_shot else []
    records, skipped = [], 0
    for member in task.samples:
        for line in archives.read_lines("evals", DATA + member):
            record = _record(line, task, few_shot)
            skipped += record is None
            if record is not None:
                records.append(record)
    if skipped:
        log.warning("Evals task '%s': skipped %d of %d samples without a usable input or ideal answer",
                    task.name, skipped, skipped + len(records))
    if not records:
        raise DataError(f"Evals task '{task.name}' has no usable samples; pick another task (list_tasks() lists them)")
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])  # a task's rows do not depend on the others
    keep = min(x for x in (task.n_samples, limit, len(records)) if x is not None)
    if keep < len(records):
        records = [records[i] for i in np.sort(rng.choice(len(records), keep, replace=False))]
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def _record(line: str, task: EvalTask, few_shot: list[dict]) -> dict | None:
    try:
        sample = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(sample, dict) or "input" not in sample or "ideal" not in sample:
        return None
    ideal = sample["ideal"]
    references = [str(x).strip() for x in (ideal if isinstance(ideal, list) else [ideal]) if x is not None]
    references = [r for r in references if r]
    messages = _messages(sample["input"])
    if not references or not messages:
        return None
    if few_shot:
        messages = messages[:-1] + few_shot + messages[-1:]
    if task.task_description:
        messages = [{"role": "system", "content": str(task.task_description).strip()}] + messages
    if task.eval_class.endswith(":MatchWithSolvers"):  # it accepts the first ideal as is or capitalised
        references = list(dict.fromkeys([references[0], references[0].capitalize()]))
    return {"prompt": render_prompt(messages), "messages": messages, "response": references[0],
            "reference": references[0], "references": references, "task": task.name, "scoring": task.scoring,
            "language": task.language, "source": "evals"}


def _messages(raw) -> list[dict]:
    """Evals' input as chat messages; few-shot turns (``system`` with name ``example_user``/``example_assistant``)
    become user/assistant turns."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}] if raw.strip() else []
    if not isinstance(raw, list):
        return []
    out = []
    for m in raw:
        if not isinstance(m, dict) or m.get("content") is None:
            continue
        role = {"example_user": "user", "example_assistant": "assistant"}.get(m.get("name"), m.get("role", "user"))
        out.append({"role": str(role), "content": str(m["content"])})
    return out


def _task_rows(task: EvalTask, counts: dict[str, int]) -> int:
    rows = sum(counts.get(s, 0) for s in task.samples)
    return min(rows, task.n_samples) if task.n_samples is not None else rows


def _row_counts() -> dict[str, int]:
    """Non-empty lines of each data file: counted once (about 10 s for the 750 MB of JSONL), then cached beside the
    wheel as JSON keyed by the wheel's size and modification time."""
    path = archives.wheel_path("evals")
    stat = path.stat()
    cache = Path(f"{path}.rows.json")
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["rows"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    files = [m for m in archives.members("evals", DATA) if m.endswith(".jsonl")]
    rows = {m.removeprefix(DATA): len(archives.split_lines(text)) for m, text in zip(files, archives.iter_texts("evals", files))}
    try:
        cache.write_text(json.dumps({"key": key, "rows": rows}))
    except OSError:
        pass
    return rows
