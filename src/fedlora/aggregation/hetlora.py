"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024): clients of different ranks, zero-padded to the largest and averaged with sparsity weights.

Server: zero-pad every client's (scaled) factors to r_max; weights ``ω_u = ‖s_u B_u A_u‖_F / Σ_v ‖s_v B_v A_v‖_F``
(the paper's sparsity-weighted aggregation: a client whose update is larger counts more);
``B_g = Σ ω_u pad(√s_u B_u)``, ``A_g = Σ ω_u pad(√s_u A_u)``. Client u receives ``(B_g[:, :r_u], A_g[:r_u]) / √s_u``
(``.clients``). ``weighting="data"`` uses the data weights w_u with segment renormalisation instead (component j
averaged over the clients that have it): linear in the uploads, so compatible with secure aggregation.

When every product is zero (e.g. all B still zero), the norms carry no information and ω = w. The norms come
from r_u×r_u Grams, ``‖BA‖_F² = tr(BᵀB·AAᵀ)``, in float64: O(U·r²(d+k)); the sums O(U·r(d+k)). Never d×k.

The reference implementation (FederatedScope) renames the keys on the way down, so its clients never receive the
aggregate; here they do, and the tests check it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import batched, stack_padded
from ._common import pad_combine, segment_combine
from .registry import register_rule
from .result import Aggregate

WEIGHTINGS = ("sparsity", "data")


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * (d + k), r * (d + k)  # r_u(d+k) each way: the client's own truncation


def sparsity_weights(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Tensor:
    """``ω_u ∝ ‖B_u A_u‖_F`` (float64, CPU, sums to 1); the data weights ``w`` when every product is zero.

    Batched: the float64 stacks ``(U, d, R)`` and ``(U, R, k)``, zero-padded to the largest rank R (exact: padded
    columns of B and rows of A add nothing to ``tr(BᵀB·AAᵀ)``), two batched Grams and one host read for the lot
    (the per-client form reads each norm back: U device round trips). For uploads on the CPU (``_batch``), the
    per-client form: no float64 copy of all the uploads at once, and host reads are free there."""
    if not batched(As[0].device):
        return _reference_sparsity_weights(Bs, As, w)
    B = stack_padded(Bs, 1, torch.float64)
    A = stack_padded(As, 0, torch.float64)
    sq = (torch.bmm(B.transpose(1, 2), B) * torch.bmm(A, A.transpose(1, 2))).sum((1, 2))  # tr(BᵀB AAᵀ) per client
    omega = sq.clamp_min(0.0).sqrt().cpu()
    total = float(omega.sum())
    return w.clone() if total == 0.0 else omega / total


def _reference_sparsity_weights(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Tensor:
    norms = []
    for B, A in zip(Bs, As):
        B64, A64 = B.to(torch.float64), A.to(torch.float64)
        norms.append(float((B64.T @ B64 * (A64 @ A64.T)).sum().clamp_min(0.0).sqrt()))  # tr(BᵀB AAᵀ), both symmetric
    omega = torch.tensor(norms, dtype=torch.float64)
    total = float(omega.sum())
    return w.clone() if total == 0.0 else omega / total


@register_rule("hetlora", comm=_comm, mixed_ranks=True)
def hetlora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, weighting: str = "sparsity") -> Aggregate:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown HetLoRA weighting {weighting!r}; choose sparsity (the paper's) or data")
    if weighting == "data":
        return Aggregate(method="hetlora", B=segment_combine(Bs, w, 1), A=segment_combine(As, w, 0), info={"weights": w.clone()})
    omega = sparsity_weights(Bs, As, w)
    return Aggregate(method="hetlora", B=pad_combine(Bs, omega, 1), A=pad_combine(As, omega, 0), info={"weights": omega})
