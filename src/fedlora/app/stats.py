"""Confidence intervals over paired seeds (front end): what `fedlora compare --seeds` reports.

Seed s gives every method the same partition, initial adapter, client sampling and batch order, so methods are
compared per seed (paired differences), not through their means. Intervals are Student-t (scipy), at 95 % by
default, over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LEVEL = 0.95


MAX_SEEDS = 1000  # paired seeds of one comparison: each is a full run per method, so more is a typo, not a plan
SEED_MAX = 2**32 - 1  # as --seed (fedlora.app.config.SEED_MAX)


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``"0,1,2"`` → [0, 1, 2]; a single number N → the seeds 0 … N−1. At most ``MAX_SEEDS`` seeds, each in
    [0, 2^32 − 1]; ``flag`` names the option in the one-line errors."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a list of integers; pass e.g. {flag} 0,1,2 or {flag} 3") from None
    if len(values) == 1:
        if values[0] < 1:
            raise ValueError(f"{flag} {text!r} asks for no seed; pass a count of at least 1 (e.g. 3) or a list (0,1,2)")
        if values[0] > MAX_SEEDS:
            raise ValueError(f"{flag} {text!r} asks for {values[0]} seeds, more than {MAX_SEEDS} (each is a full run of every method); "
                             f"pass a count from 1 to {MAX_SEEDS}, e.g. {flag} 3")
        return list(range(values[0]))
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r} repeats a seed or names none; pass distinct seeds, e.g. 0,1,2")
    if len(values) > MAX_SEEDS:
        raise ValueError(f"{flag} lists {len(values)} seeds, more than {MAX_SEEDS}; pass at most {MAX_SEEDS}")
    bad = [v for v in values if not 0 <= v <= SEED_MAX]
    if bad:
        raise ValueError(f"{flag} {text!r}: seed {bad[0]} is outside [0, {SEED_MAX}] (2^32 − 1); pass seeds in that range")
    return values


def interval(values: Sequence[float | None], level: float = LEVEL) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval of the mean; the half-width is NaN below two finite values.
    Values that are None or NaN (a metric a run did not record) are left out."""
    from scipy import stats

    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not x:
        return math.nan, math.nan
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def paired(values: Sequence[float | None], reference: Sequence[float | None], level: float = LEVEL) -> tuple[float, float]:
    """(mean, half-width) of the per-seed differences ``values[s] − reference[s]`` (same seed order)."""
    if len(values) != len(reference):
        raise ValueError(f"paired differences need one value per seed on both sides, got {len(values)} and {len(reference)}")
    diffs = [None if a is None or b is None else float(a) - float(b) for a, b in zip(values, reference)]
    return interval(diffs, level)


def distinguishable(mean: float, half: float) -> bool:
    """Whether an interval excludes 0 (NaN half-width, i.e. one seed: never)."""
    return not math.isnan(half) and abs(mean) > half
