"""Rank-r optimal aggregation: broadcast the truncated SVD of the ideal update.

``B̂Â = [ΔW*]_r`` (Eckart–Young: no rank-r broadcast is closer to ``ΔW* = Σ w_u B_u A_u``), split evenly as
``B̂ = U_r Σ_r^{1/2}``, ``Â = Σ_r^{1/2} V_rᵀ``. ``ΔW* = B_cat W A_cat`` with ``B_cat = [B_1 … B_U]`` (d×Ur),
``A_cat = [A_1; …; A_U]`` and ``W = diag(w) ⊗ I_r``; orthonormal-times-small factorisations
``B_cat = Q_B R_B``, ``A_catᵀ = Q_A R_A`` reduce it to the SVD of the (Ur)×(Ur) core ``R_B W R_Aᵀ``.

R_B, R_A come from float64 Grams (``psd_factor``), not Householder QR: on CPU the Gram is a single GEMM
and several times faster than ``geqrf`` on a tall-skinny d×Ur matrix, and directions it cannot resolve
(singular values of B_cat below ~1e-7 of the largest) carry a negligible share of ``ΔW*``. The metrics in
``metrics.py`` use Householder QR so that they can certify exact methods to ~1e-12.

Cost O((d+k)(Ur)² + (Ur)³); never forms a d×k matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_int, gram, psd_factor, stack64, weights_per_column
from .result import Aggregate


def svd(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, rank: int | None = None) -> Aggregate:
    r = Bs[0].shape[1]
    rank = r if rank is None else check_int(rank, "rank", 1)
    dtype, device = Bs[0].dtype, Bs[0].device
    d, k = Bs[0].shape[0], As[0].shape[1]

    B_cat = stack64(Bs, dim=1)  # d×Ur
    A_catT = stack64([A.T for A in As], dim=1)  # k×Ur
    VB, sB = psd_factor(gram(B_cat))  # B_cat = Q_B · diag(sB)·VBᵀ
    VA, sA = psd_factor(gram(A_catT))
    RB, RA = sB[:, None] * VB.T, sA[:, None] * VA.T
    core = RB @ (weights_per_column(w, [r] * len(Bs))[:, None] * RA.T)  # Q_Bᵀ ΔW* Q_A
    if core.numel():
        Uc, sigma, Vch = torch.linalg.svd(core, full_matrices=False)
    else:  # every B or every A is zero: ΔW* = 0
        Uc, sigma, Vch = core.new_zeros(core.shape[0], 0), core.new_zeros(0), core.new_zeros(0, core.shape[1])
    tiny = float(sigma[0]) * max(core.shape) * torch.finfo(torch.float64).eps if sigma.numel() else 0.0
    keep = min(rank, int((sigma > tiny).sum()))

    # B̂ = Q_B U_r Σ_r^{1/2} = B_cat · VB diag(1/sB) U_r Σ_r^{1/2}: a d×Ur by Ur×rank product, never d×k.
    root = sigma[:keep].sqrt()
    MB = VB @ ((Uc[:, :keep] * root) / sB[:, None])
    MA = VA @ ((Vch[:keep].T * root) / sA[:, None])
    B_hat = torch.zeros(d, rank, dtype=dtype, device=device)
    A_hat = torch.zeros(rank, k, dtype=dtype, device=device)
    B_hat[:, :keep] = B_cat @ MB.to(device)
    A_hat[:keep] = (A_catT @ MA.to(device)).T
    return Aggregate(method="svd", B=B_hat, A=A_hat, info={"singular_values": sigma, "rank": keep})
