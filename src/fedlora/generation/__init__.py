"""Answer-level scoring of generated text: answer extraction, exact match, and pass@1 of code in a sandbox.

Pure functions over strings (and, for code, a subprocess); no models, no I/O beyond the sandbox's temporary
directory. Imports nothing from the rest of fedlora, so any layer may use it.
"""

from fedlora.generation.answers import (
    SCORINGS,
    extract_answer,
    extract_code,
    gsm8k_reference,
    last_number,
    normalise_text,
    score,
)
from fedlora.generation.sandbox import RunResult, run_program

__all__ = [
    "SCORINGS", "extract_answer", "extract_code", "gsm8k_reference", "last_number", "normalise_text", "score",
    "RunResult", "run_program",
]
