"""Extracting the final answer from generated text and scoring it against a reference.

Three scorings, chosen per data set (``SCORINGS``):

- ``exact``: exact match of the normalised answer: the first non-empty line of the generation, lower-cased,
  whitespace collapsed, surrounding quotes, asterisks and punctuation stripped (``" Positive."`` → ``positive``).
- ``number``: GSM8K style: the last number in the generation equals the reference's number (commas, a leading
  ``$`` and trailing zeros after the decimal point do not matter: ``$1,000.00`` = ``1000``).
- ``pass@1``: the code in the generation (its first fenced block, else all of it) followed by the task's tests
  exits with status 0 in the sandbox (:func:`fedlora.generation.sandbox.run_program`) within the time limit.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

SCORINGS: tuple[str, ...] = ("exact", "number", "pass@1")

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


def extract_answer(scoring: str, text: str) -> str | None:
    """What ``scoring`` compares: the normalised answer (exact), the last number (number), the code (pass@1)."""
    if scoring == "exact":
        return normalise_text(text)
    if scoring == "number":
        return last_number(text)
    if scoring == "pass@1":
        return extract_code(text)
    raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")


def score(scoring: str, generation: str, reference: str, tests: str | None = None, *, timeout: float = 10.0) -> bool:
    """Whether one generation is correct under ``scoring`` (pass@1 runs the code against ``tests``)."""
    if scoring == "exact":
        return normalise_text(generation) == normalise_text(reference)
    if scoring == "number":
        got = last_number(generation)
        return got is not None and got == last_number(reference)
    if scoring == "pass@1":
        from fedlora.generation.sandbox import run_program

        if not tests:
            raise ValueError("pass@1 needs the task's tests for every example; the data has none (pass --scoring exact)")
        return run_program(extract_code(generation) + "\n\n" + tests, timeout=timeout).passed
    raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
