"""Extracting the final answer from generated text and scoring it against a reference.

Scorings, chosen per data set (``SCORINGS``); a reference may be one string or a list of acceptable ones (any
matching counts):

- ``exact``: exact match of the normalised answer: the first non-empty line of the generation, lower-cased,
  whitespace collapsed, surrounding quotes, asterisks and punctuation stripped (``" Positive."`` → ``positive``).
- ``number``: GSM8K style: the last number in the generation equals the reference's number (commas, a leading
  ``$`` and trailing zeros after the decimal point do not matter: ``$1,000.00`` = ``1000``).
- ``pass@1``: the code in the generation (its first fenced block, else all of it) followed by the task's tests
  exits with status 0 in the sandbox (:func:`fedlora.generation.sandbox.run_program`) within the time limit.

The OpenAI Evals rules (:mod:`fedlora.data.evals_registry` tags each task with the rule of its eval class):

- ``prefix`` (``Match``): the generation, leading whitespace stripped, starts with a reference (case-sensitive).
- ``includes`` (``Includes``): a reference occurs in the generation (case-sensitive); ``includes_nocase`` ignores
  case (``Includes`` with ``ignore_case: true``).
- ``fuzzy`` (``FuzzyMatch``): after SQuAD-style normalisation (lower case, punctuation and the articles a/an/the
  removed, whitespace collapsed) one of generation and reference contains the other; two empty strings match.
Empty references never match (in Evals an empty ``ideal`` would match everything).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

SCORINGS: tuple[str, ...] = ("exact", "number", "pass@1", "prefix", "includes", "includes_nocase", "fuzzy")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_STRIP = " \t\r\n\"'`*_.,;:!?()[]{}<>"
_FENCE = re.compile(r"```[ \t]*(?:[A-Za-z0-9_+-]+)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def normalise_text(text: str) -> str:
    """The first non-empty line, lower-cased, inner whitespace collapsed, surrounding punctuation stripped."""
    for line in str(text).splitlines():
        line = " ".join(line.split()).strip(_STRIP)
        if line:
            return line.lower()
    return ""


def _canonical_number(raw: str) -> str | None:
    raw = raw.replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    """The last number in ``text`` in canonical form (``"1,234.50"`` → ``"1234.5"``), or None if there is none."""
    for raw in reversed(_NUMBER.findall(str(text))):
        number = _canonical_number(raw.rstrip(","))
        if number is not None:
            return number
    return None


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution: the number after its last ``####``."""
    tail = str(answer).rpartition("####")[2]
    number = last_number(tail)
    if number is None:
        raise ValueError(f"GSM8K answer {answer[-60:]!r} has no number after '####'; check the data set's answer column")
    return number


def extract_code(text: str) -> str:
    """The program in a generation: its first fenced block (an unterminated fence runs to the end), else the text."""
    match = _FENCE.search(str(text))
    return match.group(1) if match else str(text)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_squad(text: str) -> str:
    """SQuAD/Evals normalisation: lower case, ASCII punctuation and the articles a/an/the removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION)).split())


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(r) for r in reference]


def prefix_match(generation: str, reference: str | Sequence[str]) -> bool:
    """OpenAI Evals' ``Match``: the generation (leading whitespace stripped) starts with a non-empty reference."""
    text = str(generation).lstrip()
    return any(ref.strip() and text.startswith(ref.strip()) for ref in _references(reference))


def includes_match(generation: str, reference: str | Sequence[str], *, ignore_case: bool = False) -> bool:
    """OpenAI Evals' ``Includes``: a non-empty reference occurs in the generation."""
    text = str(generation).lower() if ignore_case else str(generation)
    return any(ref and (ref.lower() if ignore_case else ref) in text for ref in _references(reference))


def fuzzy_match(generation: str, reference: str | Sequence[str]) -> bool:
    """OpenAI Evals' ``FuzzyMatch``: normalised, one of generation and reference contains the other."""
    got = normalise_squad(generation)
    for ref in map(normalise_squad, _references(reference)):
        if (got in ref or ref in got) if got and ref else got == ref:
            return True
    return False


def extract_answer(scoring: str, text: str) -> str | None:
    """What ``scoring`` compares: the normalised answer (exact), the last number (number), the code (pass@1), the
    stripped text (prefix, includes) or its SQuAD normalisation (fuzzy)."""
    if scoring == "exact":
        return normalise_text(text)
    if scoring == "number":
        return last_number(text)
    if scoring == "pass@1":
        return extract_code(text)
    if scoring in ("prefix", "includes", "includes_nocase"):
        return str(text).strip()
    if scoring == "fuzzy":
        return normalise_squad(text)
    raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")


def score(
    scoring: str, generation: str, reference: str | Sequence[str], tests: str | None = None, *, timeout: float = 10.0
) -> bool:
    """Whether one generation is correct under ``scoring`` against ``reference`` (one string, or a list of which any
    may match); pass@1 runs the code against ``tests``."""
    if scoring == "exact":
        return any(normalise_text(generation) == normalise_text(ref) for ref in _references(reference))
    if scoring == "number":
        got = last_number(generation)
        return got is not None and any(got == last_number(ref) for ref in _references(reference))
    if scoring == "prefix":
        return prefix_match(generation, reference)
    if scoring in ("includes", "includes_nocase"):
        return includes_match(generation, reference, ignore_case=scoring == "includes_nocase")
    if scoring == "fuzzy":
        return fuzzy_match(generation, reference)
    if scoring == "pass@1":
        from fedlora.generation.sandbox import run_program

        if not tests:
            raise ValueError("pass@1 needs the task's tests for every example; the data has none (pass --scoring exact)")
        return run_program(extract_code(generation) + "\n\n" + tests, timeout=timeout).passed
    raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
