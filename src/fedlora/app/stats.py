"""Confidence intervals over paired seeds (front end): what `fedlora compare --seeds` reports.

Seed s gives every method the same partition, initial adapter, client sampling and batch order, so methods are
compared per seed (paired differences), not through their means. Intervals are Student-t (scipy), at 95 % by
default, over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LEVEL = 0.95


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → [0, 1, 2]; a single number N → the seeds 0 … N−1."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a list of integers; pass e.g. --seeds 0,1,2 or --seeds 3") from None
    if len(values) == 1:
        if values[0] < 1:
            raise ValueError(f"--seeds {text!r} asks for no seed; pass a count of at least 1 (e.g. 3) or a list (0,1,2)")
        return list(range(values[0]))
    if not values or len(set(values)) != len(values):
        raise ValueError(f"--seeds {text!r} repeats a seed or names none; pass distinct seeds, e.g. 0,1,2")
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
