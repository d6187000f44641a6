"""Answer rules for generated text scored against a list of references (any match counts), as benchmarks use them.

- ``exact``: SQuAD's normalised exact match (lower-case, punctuation and the articles a/an/the removed, whitespace
  collapsed; ``normalize_answer`` of the SQuAD v1.1 evaluation script): ``"The Eiffel tower."`` = ``"eiffel Tower"``.
- ``includes``, ``includes_nocase``, ``prefix``, ``fuzzy``: OpenAI Evals' own rules (``Includes`` with and without
  ``ignore_case``, ``Match``, ``FuzzyMatch``), as :mod:`fedlora.generation.answers` defines them, so a task of the Evals
  registry is scored by the rule its registry entry names.
- ``number``: the last number of the generation equals the reference's (GSM8K; a reference holding ``####`` is a
  GSM8K solution and its number after the last ``####`` counts): :func:`fedlora.generation.answers.last_number`.
- ``choice``: the choice letter the generation picks (``"B"``, ``"(B)"``, ``"B. text"``, ``"... the answer is (B)"``)
  equals the reference letter (``"B"`` or ``"(B)"``); BBH's multiple-choice subtasks and MMLU asked to generate.

Pure functions over strings; imports only :mod:`fedlora.generation.answers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from fedlora.generation.answers import fuzzy_match, gsm8k_reference, includes_match, last_number, normalise_squad, prefix_match

# In order of trust: the generation starts with the letter; it says "answer is X"; it names "(X)" somewhere.
_CHOICE = (
    re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.:)]|\s*$))", re.IGNORECASE),
    re.compile(r"answer(?:\s+is|:)?\s*\(?([A-Z])\b\)?", re.IGNORECASE),
    re.compile(r"\(([A-Z])\)"),
)


squad_normalise = normalise_squad  # SQuAD v1.1's ``normalize_answer``: lower-case, no punctuation or articles, one space


def choice_letter(text: str) -> str | None:
    """The upper-case choice letter ``text`` picks, or None (see the module docstring for the forms read)."""
    for pattern in _CHOICE:
        match = pattern.search(str(text))
        if match:
            return next(g for g in match.groups() if g).upper()
    return None


def _reference_number(reference: str) -> str | None:
    return gsm8k_reference(reference) if "####" in reference else last_number(reference)


def _exact(generation: str, reference: str) -> bool:
    return squad_normalise(generation) == squad_normalise(reference)


def _number(generation: str, reference: str) -> bool:
    got = last_number(generation)
    return got is not None and got == _reference_number(reference)


def _choice(generation: str, reference: str) -> bool:
    got = choice_letter(generation)
    return got is not None and got == choice_letter(reference)


_ANSWER_IS = re.compile(r"answer is:?\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def _answer_is(generation: str, reference: str) -> bool:
    """Chain-of-thought answers (BBH's "… So the answer is (C)."): the text after the last "answer is" matches the
    reference (a choice letter as :func:`choice_letter` reads it, anything else by SQuAD exact match)."""
    found = _ANSWER_IS.findall(str(generation))
    if not found:
        return False
    said = found[-1]
    letter = choice_letter(reference)
    if letter is not None and re.fullmatch(r"\(?[A-Z]\)?", reference.strip()):
        return choice_letter(said) == letter
    return _exact(said, reference)


RULES: dict[str, Callable[[str, str], bool]] = {
    "answer_is": _answer_is,
    "exact": _exact, "number": _number, "choice": _choice,
    "includes": includes_match, "includes_nocase": lambda g, r: includes_match(g, r, ignore_case=True),
    "prefix": prefix_match, "fuzzy": fuzzy_match,
}


def judge(rule: str, generation: str, references: Sequence[str]) -> bool:
    """Whether ``generation`` is correct under ``rule`` against any of ``references``."""
    try:
        check = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown answer rule {rule!r}; choose one of {', '.join(RULES)}") from None
    if isinstance(references, str):
        references = [references]
    return any(check(generation, ref) for ref in references)
