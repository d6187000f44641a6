"""FedMomentum (Yan et al., 2026): broadcast the rank-r truncated SVD of the ideal update and fold the next
components, up to an energy threshold, into the frozen base of every client.

Server: ``ΔW* = Σ w_u B_u A_u`` (factor space) and its SVD ``U Σ Vᵀ`` with ``σ_1 ≥ σ_2 ≥ …``. The top r components
are the new LoRA, split evenly: ``B̂ = U_r Σ_r^{1/2}``, ``Â = Σ_r^{1/2} V_rᵀ`` (clients replace theirs with it). The
components after them are folded into W0, one after another, until the cumulative energy ``Σ_{j≤m} σ_j²`` reaches
``τ ‖ΔW*‖_F²`` (default τ = 0.9999): the fold is ``L R`` with ``L = U_{r+1..m} Σ^{1/2}``, ``R = Σ^{1/2} V_{r+1..m}ᵀ``
(``base_delta_factors``; none when the top r already reach τ). Hence ``B̂Â + L R = Σ_{j≤max(m,r)} σ_j u_j v_jᵀ`` and
``‖ΔW* − ΔŴ‖_F² = Σ_{j>max(m,r)} σ_j² ≤ (1 − τ) ‖ΔW*‖_F²``; with τ = 1 every numerically non-zero component is kept and
the round is exact. When ΔW* has fewer than r non-zero components, the missing columns of B̂ and rows of Â are zero
(the public FedLLM-Factory code crashes there). The fold is at the adapter's scale: the protocol sends it as a
base-weight update that ``AdapterHandle.fold`` multiplies by s = α/r, as the LoRA itself is (FedLLM-Factory folds
without α/r: s times too small, 4× at α = 16, r = 4).

The SVD is ``svd.py``'s factor-space one (Gram root of the stacked A, the (Ur)×(Ur) core's eigendecomposition,
thin products), run for all Ur components so that the energies and the fold come from one eigensolve.
Cost O((d+k)(Ur)² + (Ur)³); never forms a d×k matrix. The fold's rank f = max(m, r) − r depends on the spectrum,
so what goes down is data-dependent: r(d+k) + min(dk, f(d+k)), at most f = min(Ur, d, k) − r (``comm`` declares
that upper bound: τ = 1 with ΔW* of full rank).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import register_rule
from .result import Aggregate
from .svd import truncated_svd


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    """Up r(d+k); down r(d+k) plus the fold, dense or factored, at its largest (an upper bound: the fold's rank
    depends on the spectrum of ΔW* and τ)."""
    fold = max(min(U * r, d, k) - r, 0)
    return r * (d + k), r * (d + k) + min(d * k, fold * (d + k))


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise ValueError(f"FedMomentum energy threshold tau is {tau!r}; pass a number in [0, 1] such as 0.9999")
    return float(tau)


def components_to_keep(sigma2: Tensor, rank: int, tau: float) -> int:
    """m: how many leading components reach ``τ`` of the total energy ``Σ σ_j²`` (all of the ``rank`` numerically
    non-zero ones when τ = 1; 0 when ΔW* = 0). ``sigma2`` is descending, float64."""
    if rank == 0:
        return 0
    energy = sigma2[:rank]
    if tau >= 1.0:
        return rank
    cumulative = torch.cumsum(energy, 0)
    reached = torch.nonzero(cumulative >= tau * float(energy.sum()))
    return min(int(reached[0]) + 1, rank) if reached.numel() else rank


@register_rule("fedmomentum", comm=_comm, quadratic=True)
def fedmomentum(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, tau: float = 0.9999) -> Aggregate:
    tau = check_tau(tau)
    r = Bs[0].shape[1]
    n = sum(B.shape[1] for B in Bs)  # ΔW* = B_cat W A_cat has at most U·r components
    full = truncated_svd(Bs, As, w, n, method="fedmomentum")  # every component, split U Σ^{1/2}, Σ^{1/2} Vᵀ
    sigma = full.info["singular_values"]
    rank = full.info["rank"]  # numerically non-zero components; the columns after them are zero
    m = components_to_keep(sigma.square(), rank, tau)
    B_hat, A_hat = full.B[:, :r].contiguous(), full.A[:r].contiguous()  # zero-padded when rank < r
    fold = None
    if m > r:
        fold = (full.B[:, r:m].contiguous(), full.A[r:m].contiguous())
    total = float(sigma[:rank].square().sum())
    kept = float(sigma[: max(m, min(r, rank))].square().sum())
    info = {"singular_values": sigma, "rank": rank, "fold_rank": max(m - r, 0), "tau": tau,
            "energy_kept": kept / total if total > 0 else 1.0}
    return Aggregate(method="fedmomentum", B=B_hat, A=A_hat, base_delta_factors=fold, info=info)
