"""Rank-r optimal aggregation: broadcast the truncated SVD of the ideal update.

``B̂Â = [ΔW*]_r`` (Eckart–Young: no rank-r broadcast is closer to ``ΔW* = Σ w_u B_u A_u``), split evenly as
``B̂ = U_r Σ_r^{1/2}``, ``Â = Σ_r^{1/2} V_rᵀ``. With ``B_cat = [B_1 … B_U]`` (d×Ur), ``A_cat = [A_1; …; A_U]``
and ``W = diag(w) ⊗ I_r``, ``ΔW* = B_cat W A_cat``. Factor the A-side Gram ``A_cat A_catᵀ = L Lᵀ``, so that
``A_catᵀ = Q_A Lᵀ`` with orthonormal ``Q_A`` (a QR of the stacked A in a Gram-space form); then
``ΔW*ᵀΔW* = Q_A T Q_Aᵀ`` with the (Ur)×(Ur) core ``T = Lᵀ W (B_catᵀB_cat) W L``, whose top-r eigenpairs
``T Z = Z Σ²`` give ``V_r = Q_A Z_r`` and ``U_rΣ_r = ΔW* V_r = B_cat W L Z_r``. Hence

    B̂ = B_cat · (W L Z_r Σ_r^{-1/2}),      Â = (L⁻ᵀ Z_r Σ_r^{1/2})ᵀ · A_cat,

a d×Ur by Ur×r product each: nothing d×k is ever formed.

Why Grams and one symmetric eigensolve rather than Householder QRs of both stacks and an SVD of their core:
on this kind of CPU the float64 Gram of a float32 d×Ur stack costs about what ``geqrf`` does, and it is what
FLoRA-NA needs anyway; one Cholesky and one ``eigh`` of the core cost a fraction of two QRs, an ``eigh`` each
and an SVD (about 3× less at U·r = 800). The Gram resolves singular directions of the stacks down to ~1e-8
of the largest, finer than float32 uploads carry; for float64 uploads ``svd`` meets the Eckart–Young bound to
~1e-9 rather than 1e-15. ``metrics.py`` uses Householder QR so that it can certify exact methods to ~1e-12.
If ``ΔW*`` has numerical rank below r, the extra columns of B̂ and rows of Â are zero.

Cost O((d+k)(Ur)² + (Ur)³); never forms a d×k matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_int, gram, gram_root, stack, weights_per_column
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate


@register_rule("svd", comm=factors_comm)
def svd(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, rank: int | None = None) -> Aggregate:
    r = Bs[0].shape[1]
    return truncated_svd(Bs, As, w, r if rank is None else check_int(rank, "rank", 1), method="svd")


def truncated_svd(Bs: list[Tensor], As: list[Tensor], w: Tensor, rank: int, *, method: str) -> Aggregate:
    """``[ΔW*]_rank`` split as ``U Σ^{1/2}``, ``Σ^{1/2} Vᵀ``; clients may have different ranks (FlexLoRA)."""
    d, k, dtype = Bs[0].shape[0], As[0].shape[1], Bs[0].dtype
    # Float64 throughout, including the two final d×Ur-by-Ur×r products: the coefficients M_B, M_A combine
    # nearly parallel client factors, and a float32 product of them lost the bound for slightly drifting
    # clients (ρ 4.0e-7 against FedIT's 3.8e-7 in the float32 drift test).
    B_cat, A_cat = stack(Bs, dim=1), stack(As, dim=0)  # d×Ur, Ur×k, float64

    root = gram_root(gram(A_cat, rows=True))  # A_cat A_catᵀ = L Lᵀ
    WL = weights_per_column(w, [B.shape[1] for B in Bs])[:, None] * root.L
    T = WL.T @ gram(B_cat) @ WL  # Lᵀ W GB W L = Q_Aᵀ ΔW*ᵀΔW* Q_A
    lam, Z = torch.linalg.eigh(T)  # ascending: σ² of ΔW*
    lam, Z = lam.flip(0).clamp_min(0.0), Z.flip(1)
    # σ² carries absolute errors ~eps·σ_1², so singular values below ~1e-7·σ_1 are numerically zero.
    tiny = float(lam[0]) * max(T.shape[0], 1) * torch.finfo(torch.float64).eps if lam.numel() else 0.0
    keep = min(rank, int((lam > tiny).sum())) if tiny > 0 else 0

    root_sigma = lam[:keep].sqrt().sqrt()  # Σ_r^{1/2}
    MB = WL @ (Z[:, :keep] / root_sigma)  # B̂ = B_cat · W L Z_r Σ_r^{-1/2}
    MA = root.solve_t(Z[:, :keep] * root_sigma)  # Âᵀ = A_catᵀ · L⁻ᵀ Z_r Σ_r^{1/2}
    # As (MBᵀ B_catᵀ)ᵀ: BLAS runs this wide product ~2.5× faster than the skinny d×Ur · Ur×r one.
    B_hat = (MB.T.to(B_cat) @ B_cat.T).T.to(dtype, memory_format=torch.contiguous_format)
    A_hat = (MA.T.to(A_cat) @ A_cat).to(dtype)
    if keep < rank:  # numerical rank below r: pad with zeros so the shapes stay d×rank, rank×k
        B_hat = torch.cat([B_hat, B_hat.new_zeros(d, rank - keep)], dim=1)
        A_hat = torch.cat([A_hat, A_hat.new_zeros(rank - keep, k)], dim=0)
    return Aggregate(method=method, B=B_hat, A=A_hat, info={"singular_values": lam.sqrt(), "rank": keep})
