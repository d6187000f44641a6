"""FedRot-LoRA ("FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA", ICML 2026; official code
haoran-zh/FedRot-LoRA): clients rotate their factors toward the global ones before uploading; the server is FedIT.

``B_u A_u = (B_u R)(Rᵀ A_u)`` for every orthogonal R, so two clients can hold the same update in rotated
coordinates of the rank space, and FedIT's separate means of B and A then interfere. Before uploading, client u
replaces ``(B_u, A_u)`` with ``(B_u R, Rᵀ A_u)``, R in SO(r) the orthogonal Procrustes solution that brings one
factor closest to the global factor it started the round from (the reference):

- side ``"A"`` (odd rounds from 3): ``R* = argmin_{R ∈ SO(r)} ‖Rᵀ A_u − A_ref‖_F``, from ``M = A_ref A_uᵀ``;
- side ``"B"`` (even rounds): ``R* = argmin_{R ∈ SO(r)} ‖B_u R − B_ref‖_F``, from ``M = B_refᵀ B_u``;
- round 1: no rotation (the reference B is PEFT's zero init; nothing to align to).

That is METHODS.md's order; the official code (0-based rounds, ``initialshare: A``) aligns A in the second round
and B in the third: ``rotation_side(rnd, first="A")``.

Both reduce to maximising ``tr(M R)``: with ``M = U Σ Vᵀ``, ``R* = V diag(1, …, 1, det(UVᵀ)) Uᵀ`` (the last sign
keeps det R = +1: a rotation, never a reflection). Soft version (the default, λ = 0.5):
``R′ = (1 − λ) I + λ R*`` projected back to SO(r) by the same SVD-and-sign step (its nearest rotation); λ = 1 is
the hard rotation R*, λ = 0 none. The server then runs FedIT on the rotated uploads, so ``fedrot`` below is
FedIT's rule under this name (linear in the uploads).

``reflect=True`` is the official code's hard alignment (``rotation_align_optimization``, what ``rotate_lambda``
calls): ``R* = V Uᵀ`` over all of O(r), without the determinant fix, so a misalignment that is a reflection
(``B_u = B P``, ``A_u = Pᵀ A`` with det P = −1) is undone exactly, where SO(r) can only come as close as a
rotation can. The product ``B_u A_u`` is kept all the same (``(B R)(Rᵀ A) = BA`` for every orthogonal R). Only
with λ = 1: the soft step toward an orthogonal R* of det −1 passes through ``(I + R*)/2``, singular in R*'s
eigenvalue −1 direction, where the nearest orthogonal matrix is not defined.

Cost on the client, per adapted matrix: the r×r product M in O(r²·k) (side A) or O(r²·d) (side B), two r×r SVDs,
and the rotation of both factors in O(r²(d+k)); float64 throughout, cast back to the factors' dtype. The server
costs FedIT's O(U·r(d+k)). Nothing d×k is formed anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fedit import factors_comm, fedit
from .registry import register_rule
from .result import Aggregate

__all__ = ["fedrot", "procrustes_rotation", "rotate", "rotation_side", "to_rotation"]

SIDES = ("A", "B")


def rotation_side(rnd: int, first: str = "B") -> str | None:
    """Which factor is aligned in round ``rnd`` (1-based): none in round 1, ``first`` in even rounds, the other in
    odd rounds from 3. ``first="B"`` is METHODS.md's order (B in even rounds, A in odd ones); ``first="A"`` is the
    official code's (``initialshare: A`` with its 0-based round counter aligns A in the second round)."""
    if first not in SIDES:
        raise ValueError(f"first is {first!r}; pass 'B' (METHODS.md: B in even rounds) or 'A' (the official code's order)")
    if rnd <= 1:
        return None
    return first if rnd % 2 == 0 else SIDES[first == "A"]


def to_rotation(M: Tensor, *, reflect: bool = False) -> Tensor:
    """The rotation R ∈ SO(r) maximising ``tr(M R)`` (float64): ``M = U Σ Vᵀ``, ``R = V diag(1, …, det(UVᵀ)) Uᵀ``.
    For ``M = Xᵀ`` this is the nearest rotation to X (the projection onto SO(r)). A zero M gives I. ``reflect``:
    the maximiser over all of O(r), ``V Uᵀ`` (no determinant fix; it may be a reflection)."""
    M = M.to(torch.float64)
    if not bool(M.any()):
        return torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    U, _, Vh = torch.linalg.svd(M)
    V = Vh.mT
    if not reflect and float(torch.linalg.det(U @ Vh)) < 0:  # det(UVᵀ) = −1: flip the direction of the smallest singular value
        V = torch.cat([V[:, :-1], -V[:, -1:]], dim=1)
    return V @ U.mT


def procrustes_rotation(ref: Tensor, mine: Tensor, side: str, *, lam: float = 1.0, reflect: bool = False) -> Tensor:
    """Client factor ``mine`` aligned to the reference ``ref``: the r×r rotation R (float64, det +1) such that
    ``Rᵀ mine`` (side ``"A"``, both r×k) or ``mine R`` (side ``"B"``, both d×r) is closest to ``ref`` in Frobenius
    norm among rotations (λ = 1), or the soft ``proj_SO(r)((1 − λ) I + λ R*)`` for 0 ≤ λ < 1. ``reflect``: the
    closest among all orthogonal matrices (the official hard alignment; reflections allowed), λ = 1 only."""
    if side not in SIDES:
        raise ValueError(f"side is {side!r}; pass 'A' (align A_u to A_ref) or 'B' (align B_u to B_ref)")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"the rotation strength lam is {lam!r}; pass a number in [0, 1] (1: the full Procrustes rotation)")
    if reflect and lam != 1.0:
        raise ValueError(f"the alignment that allows reflections is the hard one, but lam is {lam!r}: pass lam=1 with reflect "
                         "(a soft step toward a reflection passes through a singular matrix)")
    if ref.shape != mine.shape:
        raise ValueError(f"the reference factor is {tuple(ref.shape)} but the client's is {tuple(mine.shape)}; align factors of one shape")
    ref64, mine64 = ref.to(torch.float64), mine.to(torch.float64)
    M = ref64 @ mine64.mT if side == "A" else ref64.mT @ mine64  # A_ref A_uᵀ, or B_refᵀ B_u: both r×r
    R = to_rotation(M, reflect=reflect)
    if lam == 1.0:
        return R
    eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
    if lam == 0.0:
        return eye
    return to_rotation(((1.0 - lam) * eye + lam * R).mT)  # the nearest rotation to the interpolation


def rotate(B: Tensor, A: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """``(B R, Rᵀ A)``: the same product BA in rotated coordinates; computed in float64, returned in each factor's
    dtype."""
    R = R.to(torch.float64)
    return (B.to(torch.float64) @ R).to(B.dtype), (R.mT @ A.to(torch.float64)).to(A.dtype)


@register_rule("fedrot", comm=factors_comm)
def fedrot(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    """The server half of FedRot-LoRA: FedIT's separate means of the (already rotated) uploads."""
    agg = fedit(Bs, As, w)
    return Aggregate(method="fedrot", B=agg.B, A=agg.A, p=agg.p, q=agg.q)
