"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025; no public code): FedIT's means with a server-side correction of B only.

Server: ``Ā = Σ w_u A_u``, ``B̄ = Σ w_u B_u`` (FedIT), then the residual correction

    ΔB = argmin_ΔB ‖ΔW* − (B̄ + ΔB) Ā‖_F² + λ ‖ΔB‖_F²,      B̄′ = B̄ + ΔB,

broadcast as ``(B̄′, Ā)``; every client starts its next round from it (the paper's "initialization refinement":
clients do not restart from the uncorrected means). Closed form, a ridge regression in the r-dimensional row
space of Ā:

    ΔB = (ΔW* − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹,   with   (ΔW* − B̄Ā) Āᵀ = Σ_u w_u B_u ((A_u − Ā) Āᵀ)   (d×r),

since ``ΔW* Āᵀ = Σ w_u B_u (A_u Āᵀ)`` and ``B̄ĀĀᵀ = Σ w_u B_u (ĀĀᵀ)``. Written as the sum over ``A_u − Ā`` the
cancellation between ``ΔW*Āᵀ`` and ``B̄ĀĀᵀ`` (nearly equal when clients drift little from a common start) happens
on the small r×k differences, not on d×r products. The inverse is taken through the eigendecomposition of the
r×r Gram ``ĀĀᵀ = V diag(μ) Vᵀ``: ``(μ + λ)⁻¹`` on every direction for λ > 0; for λ = 0 the pseudo-inverse
(directions with ``μ ≤ r·eps·μ_max`` dropped), which is the minimum-norm ΔB and leaves B̄ alone outside the
row space of Ā.

Identities (tested against dense references): with λ = 0, ``B̄′Ā = ΔW* P_Ā`` (``P_Ā = Ā⁺Ā`` the projector on the
row space of Ā), so the error is the projection residual ``‖ΔW* − ΔW* P_Ā‖_F``, the best any B can do with this
Ā; for every λ ≥ 0 the error is never above FedIT's (ΔB = 0 is a feasible point of the penalised objective).

Choices where the paper is not specific (no code is public): the paper measures the residual with a
"cosine-like" similarity and does not publish its λ; this is the Frobenius-norm form above, with absolute λ
(in the units of ĀĀᵀ) and default ``DEFAULT_LAM = 1e-3``: small against the eigenvalues of ĀĀᵀ at PEFT's
initialisation (about 1/3 for a Kaiming-uniform A, whatever k), so the correction is nearly the λ = 0 projection
while staying well-posed when Ā is rank-deficient (e.g. clients that cancel).

Cost: FedIT's O(U·r(d+k)) plus O(U·r²(d+k) + r³) for the r×r products, the d×r sum and the r×r eigensolve, in
float64. Never forms a d×k matrix. Needs each client's factors individually (not linear in the uploads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import batched
from ._common import check_tol, combine
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate

__all__ = ["DEFAULT_LAM", "lorafair"]

DEFAULT_LAM = 1e-3
_EPS64 = torch.finfo(torch.float64).eps


def _correction_target(Bs: list[Tensor], As: list[Tensor], w: Tensor, A64: Tensor) -> Tensor:
    """``(ΔW* − B̄Ā)Āᵀ = Σ w_u B_u (A_u − Ā)Āᵀ`` (d×r, float64). Batched: the U r×r blocks ``w_u (A_u − Ā)Āᵀ`` from
    one batched product, then one d×Ur-by-Ur×r GEMM with the concatenated Bs; per client on the CPU (``_batch``)."""
    if batched(As[0].device):
        M = (torch.stack(As).to(torch.float64) - A64) @ A64.T  # U×r×r
        M = M * w.to(M.device, torch.float64)[:, None, None]
        return torch.cat(Bs, dim=1).to(torch.float64) @ M.reshape(-1, M.shape[-1])
    E = Bs[0].new_zeros((Bs[0].shape[0], A64.shape[0]), dtype=torch.float64)
    for B, A, c in zip(Bs, As, w.tolist()):
        if c:
            E.addmm_(B.to(torch.float64), (A.to(torch.float64) - A64) @ A64.T, alpha=c)
    return E


@register_rule("lorafair", comm=factors_comm)
def lorafair(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, lam: float = DEFAULT_LAM) -> Aggregate:
    lam = check_tol(lam, "lorafair's ridge strength lam (λ)")
    dtype = Bs[0].dtype
    B_bar, A_bar = combine(Bs, w), combine(As, w)  # FedIT's means, in the uploads' dtype (what is broadcast)
    A64 = A_bar.to(torch.float64)
    G = A64 @ A64.T  # ĀĀᵀ, r×r
    E = _correction_target(Bs, As, w, A64)
    mu, V = torch.linalg.eigh(G)
    mu_max = float(mu[-1]) if mu.numel() else 0.0
    if lam > 0.0:
        inv = 1.0 / (mu.clamp_min(0.0) + lam)
    else:  # pseudo-inverse: the minimum-norm ΔB
        keep = mu > mu_max * G.shape[0] * _EPS64 if mu_max > 0.0 else torch.zeros_like(mu, dtype=torch.bool)
        inv = torch.where(keep, 1.0 / torch.where(keep, mu, 1.0), 0.0)
    dB = (E @ V) * inv @ V.T  # E (ĀĀᵀ + λI)⁻¹
    B_new = (B_bar.to(torch.float64) + dB).to(dtype)
    info = {"lam": lam, "correction_norm": float(torch.linalg.matrix_norm(dB)), "gram_eigenvalues": mu}
    return Aggregate(method="lorafair", B=B_new, A=A_bar, q=w.clone(), info=info)
