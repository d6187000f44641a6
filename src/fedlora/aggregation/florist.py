"""FLoRIST (Ramesh & Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated Fine-Tuning
of Large Language Models", MLSys 2026, arXiv 2506.09199): fold the energy-thresholded SVD of the ideal update.

Server, per adapted matrix: ``ΔW* = Σ w_u s_u B_u A_u`` (the scaled product space under mixed ranks; without
client scales ``Σ w_u B_u A_u``, folded at the model's s) and its SVD ``U Σ Vᵀ``, ``σ_1 ≥ σ_2 ≥ …``. The kept rank
is the smallest p whose components hold τ of the energy, ``p = min{p : Σ_{i≤p} σ_i² ≥ τ Σ_i σ_i²}`` (the official
code's energy thresholding; p = 0, nothing sent, when ΔW* = 0). Every client and the server's model fold
``F = U_p Σ_p V_pᵀ`` into the frozen base, as the factors ``(U_p Σ_p^{1/2}, Σ_p^{1/2} V_pᵀ)``
(``base_delta_factors``, the cheaper of dense dk and factored p(d+k) on the wire), and restart from a fresh LoRA at
their own rank: the aggregate's ``B``, ``A`` are that restart's zero product, never sent. Hence ``F = [ΔW*]_p``
(Eckart–Young at p) and ``‖ΔW* − F‖_F / ‖ΔW*‖_F = √(1 − E_p) ≤ √(1 − τ)`` with ``E_p`` the kept fraction of the
energy; with τ = 1 every numerically non-zero component is kept and F = ΔW*: FLoRA's fold.

The SVD is ``svd.py``'s factor-space one (the Gram root of the stacked A, the (Σr_u)² core's eigendecomposition,
two thin products), which gives the σ_i FLoRIST's SVDs of each stack and of their small core give, run for all
Σr_u components so that the energies and the fold come from one eigensolve. Cost O((d+k)(Σr_u)² + (Σr_u)³); never
forms a d×k matrix (the official code forms no d×k matrix either, but its stacks carry no α/r_u: the merge uses the
last client's scale, right only because its clients use α = 2r_u; here the scales are inside ΔW*).

Bytes: up r_u(d+k); down ``min(dk, p(d+k))``, p depending on the spectrum of ΔW* and τ, so ``comm`` declares the
largest it can be, p = min(U·r, d, k) (τ = 1 and ΔW* of full rank; under mixed ranks pass the mean rank, as for
flora); the simulator counts what is sent, and ``info["kept_rank"]`` says which p it was.
"""

from __future__ import annotations

import math

from torch import Tensor

from .fedmomentum import components_to_keep
from .frlora import FoldOnly
from .registry import register_rule
from .result import Aggregate
from .svd import truncated_svd

DEFAULT_TAU = 0.9  # the official code's default (its README uses 0.80 for heterogeneous ranks)


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    """Up r(d+k); down the fold F = [ΔW*]_p, dense or factored, at its largest p = min(U·r, d, k) (an upper bound)."""
    return r * (d + k), min(d * k, min(U * r, d, k) * (d + k))


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and 0.0 < tau <= 1.0):
        raise ValueError(f"FLoRIST energy threshold tau is {tau!r}; pass a number in (0, 1] such as 0.9 (1: fold all of ΔW*)")
    return float(tau)


@register_rule("florist", comm=_comm, mixed_ranks=True, truncates=False, quadratic=True)
def florist(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, tau: float = DEFAULT_TAU) -> Aggregate:
    tau = check_tau(tau)
    n = sum(B.shape[1] for B in Bs)  # ΔW* = B_cat W A_cat has at most Σ r_u components
    full = truncated_svd(Bs, As, w, n, method="florist")  # every component, split U Σ^{1/2}, Σ^{1/2} Vᵀ
    sigma, rank = full.info["singular_values"], full.info["rank"]
    p = components_to_keep(sigma.square(), rank, tau)
    total = float(sigma[:rank].square().sum())
    kept = float(sigma[:p].square().sum())
    fold = (full.B[:, :p].contiguous(), full.A[:p].contiguous()) if p else None
    r_max = max(B.shape[1] for B in Bs)
    B0 = full.B.new_zeros(full.B.shape[0], r_max)  # the restart: a fresh LoRA, B = 0 (its A is drawn on the client)
    A0 = full.A.new_zeros(r_max, full.A.shape[1])
    info = {"singular_values": sigma, "rank": rank, "kept_rank": p, "tau": tau, "energy_kept": kept / total if total > 0 else 1.0}
    return FoldOnly(method="florist", B=B0, A=A0, base_delta_factors=fold, info=info)
