"""Answer-level scoring of generated text: answer extraction, exact match, and pass@1 of code in a sandbox.

Pure functions over strings (and, for code, a subprocess); no models, no I/O beyond the sandbox's temporary
directory. Imports nothing from the rest of fedlora, so any layer may use it.
"""

from fedlora.generation.answers import (
    SCORINGS,
    extract_answer,
    extract_code,
    fuzzy_match,
    gsm8k_reference,
    includes_match,
    last_number,
    normalise_squad,
    normalise_text,
    prefix_match,
    score,
)
from fedlora.generation.sandbox import RunResult, run_program

__all__ = [
    "SCORINGS", "extract_answer", "extract_code", "gsm8k_reference", "last_number", "normalise_text", "score",
    "prefix_match", "includes_match", "fuzzy_match", "normalise_squad", "RunResult", "run_program",
]
