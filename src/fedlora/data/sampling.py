"""Seeded stratified sampling shared by loading (`limit`) and partitioning (hold-outs, caps, local splits).

Imports nothing from fedlora.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset


def stratified_choice(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of `n` rows of `labels` whose label mix matches the whole, as closely as integers allow.

    Each class gets floor(n·n_c/N) rows; the rows left over go to the classes with the largest remainders
    (ties broken at random), so a class too rare for a whole row is drawn by chance, not always or never.
    Returns sorted positions, so the result does not depend on the order classes are visited.
    """
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot draw {n} rows from {len(labels)}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota, remainder = np.divmod(n * counts, len(labels))
    left = n - int(quota.sum())
    # lexsort's last key is the primary one: largest remainder first, random among equals.
    order = np.lexsort((rng.random(len(classes)), -remainder))
    quota[order[:left]] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
        for c, k in zip(classes, quota)
    ]
    return np.sort(np.concatenate(picked))


def int_column(ds: Dataset, column: str) -> np.ndarray:
    """A column as an int64 array; `[:]` reads it in one Arrow call (iterating a datasets Column is per row)."""
    return np.asarray(ds[column][:], dtype=np.int64)
