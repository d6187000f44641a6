"""Screening client uploads before they reach the aggregation math.

Clients are other people's machines: an upload with missing or extra keys, the wrong shape or dtype, NaN/Inf,
or an update far larger than the round's others is rejected with a one-line reason naming the client, and the
round goes on with the rest (weights renormalised by the caller). Bad replies are data, not exceptions.

The norm rule: a client's update norm ‖upload − global‖ (over every tensor it uploads) is rejected when it
exceeds ``max_norm_ratio`` × the median of the round's update norms. It applies only with at least 3 clients
(a median of two cannot tell which one is wrong); ``max_norm_ratio = 0`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class Rejection:
    cid: int
    reason: str

    def as_dict(self) -> dict:
        return {"client": self.cid, "reason": self.reason}


# No trained LoRA-family tensor comes near this; the products and Grams of factors at this size (sums of up to 1e5
# products) stay within float32's range (3.4e38), so a value beyond it can only be a broken or hostile upload.
MAX_MAGNITUDE = 1e15

def schema(tensors: Tensors) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}


def check_structure(cid: int, tensors: Tensors, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], what: str) -> str | None:
    """The first thing wrong with one client's tensors, as a reason, or None."""
    if not isinstance(tensors, dict):
        return f"client {cid}'s {what} is a {type(tensors).__name__}, not a dict of tensors"
    missing = [n for n in expected if n not in tensors]
    if missing:
        return f"client {cid}'s {what} lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = [n for n in tensors if n not in expected]
    if extra:
        return f"client {cid}'s {what} has unexpected {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    for n, t in tensors.items():
        shape, dtype = expected[n]
        if not isinstance(t, Tensor):
            return f"client {cid}'s {what} {n!r} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != shape:
            return f"client {cid}'s {what} {n!r} has shape {tuple(t.shape)}, expected {shape}"
        if t.dtype != dtype:
            return f"client {cid}'s {what} {n!r} has dtype {t.dtype}, expected {dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"client {cid}'s {what} {n!r} contains NaN or Inf"
        if t.numel() and t.is_floating_point() and float(t.abs().max()) > MAX_MAGNITUDE:
            return (f"client {cid}'s {what} {n!r} holds a value of magnitude {float(t.abs().max()):.3g}, beyond "
                    f"{MAX_MAGNITUDE:.0e}: its products would overflow float32 in the aggregation")
    return None


def update_norm(upload: Tensors, current: Tensors) -> float:
    total = 0.0
    for n, t in upload.items():
        ref = current.get(n)
        diff = t.double() - ref.double() if ref is not None and ref.shape == t.shape else t.double()
        total += float((diff * diff).sum())
    return total**0.5


def norm_outliers(cids: list[int], norms: list[float], max_ratio: float) -> list[Rejection]:
    if not max_ratio or len(norms) < 3:
        return []
    median = float(torch.tensor(norms, dtype=torch.float64).median())
    limit = max_ratio * median
    return [
        Rejection(cid, f"client {cid}'s update norm {norm:.3g} exceeds {max_ratio:g}× the round's median {median:.3g}")
        for cid, norm in zip(cids, norms)
        if median > 0 and norm > limit
    ]
