"""How far a broadcast is from the ideal update, without forming a d×k matrix.

``divergence`` is the FLoRA-NA paper's ρ = ‖ΔW* − ΔŴ‖_F / ‖ΔW*‖_F; ``eckart_young_bound`` is the smallest ρ any
rank-r broadcast can reach. Both write the matrices involved as ``L @ R`` with thin factors and use
``‖L R‖_F = ‖T_L T_Rᵀ‖_F`` from Householder QRs ``L = Q_L T_L``, ``Rᵀ = Q_R T_R`` in float64. The QR, not a Gram
trace: ``tr(LᵀL · RRᵀ)`` subtracts numbers of size ‖ΔW*‖² and floors ρ near 1e-8, while exact methods must read
about 1e-12. Cost O((d+k)·m²) for m stacked columns (m ≤ (2U+2)r), never a d×k matrix.

Imports only torch and the helpers of this package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import check_int, check_uploads, combine, qr_r, weights_per_column
from .result import Aggregate

__all__ = ["divergence", "eckart_young_bound"]


def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def divergence(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: object, result: Aggregate, *, scales: object = None
) -> float:
    """ρ = ‖ΔW* − ΔŴ‖_F / ‖ΔW*‖_F for one adapted matrix, with ``ΔŴ = result.delta()`` never formed.

    Clients may have different ranks; with ``scales`` (each client's s_u, as given to ``aggregate``)
    ``ΔW* = Σ w_u s_u B_u A_u`` and the result is read in that scaled product space.

    For ``fedsa`` ΔŴ uses ``eval_B`` (the mean of the clients' B); when the result has none, the mean of the
    ``Bs`` given here. ρ is 0 when ``ΔW* = ΔŴ = 0`` (e.g. round one, all B zero) and ``inf`` when
    ``ΔW* = 0`` but ``ΔŴ ≠ 0``, so it is never NaN.
    """
    up = check_uploads(Bs, As, weights, same_rank=False, scales=scales)
    w = up.w if up.scales is None else up.w * up.scales
    B_res = result.B if result.B is not None else result.eval_B
    if B_res is None:  # fedsa aggregated from As only: score Σ w_u B_u, as eval_B would have
        B_res = combine(up.Bs, w)
    if result.A is None:
        raise ValueError(f"this {result.method} result has no A; pass a result returned by aggregate()")
    d, k = up.Bs[0].shape[0], up.As[0].shape[1]
    if B_res.shape[0] != d or result.A.shape[1] != k:
        raise ValueError(
            f"the result is for a {B_res.shape[0]}×{result.A.shape[1]} matrix but the uploads are {d}×{k}; "
            "pass the uploads the result was aggregated from"
        )

    # ΔW* − ΔŴ = L R with L = [w_1B_1 … w_UB_U, −B̂, −L_res] and R = [A_1; …; A_U; Â; R_res].
    wcol = weights_per_column(w, [B.shape[1] for B in up.Bs]).to(up.Bs[0].device)
    Ls = [torch.cat([_f64(B) for B in up.Bs], dim=1) * wcol, -_f64(B_res)]
    Rs = [torch.cat([_f64(A) for A in up.As], dim=0), _f64(result.A)]
    if result.base_delta_factors is not None:
        L_res, R_res = result.base_delta_factors
        Ls.append(-_f64(L_res))
        Rs.append(_f64(R_res))
    TL = qr_r(torch.cat(Ls, dim=1))
    TR = qr_r(torch.cat(Rs, dim=0).T)
    n = Ls[0].shape[1]
    # The R factor of a column prefix is the prefix of the R factor, so ‖ΔW*‖ comes from the same QRs.
    ideal = float(torch.linalg.matrix_norm(TL[:, :n] @ TR[:, :n].T))
    error = float(torch.linalg.matrix_norm(TL @ TR.T))
    if ideal == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / ideal


def eckart_young_bound(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: object, rank: int | None = None, *, scales: object = None
) -> float:
    """ρ_min = ‖ΔW* − [ΔW*]_r‖_F / ‖ΔW*‖_F: no broadcast of rank-``rank`` factors does better (0 if ΔW* = 0).

    ``rank`` defaults to the clients' largest r_u; ``scales`` as for ``divergence``. QR of the stacked factors and the singular values of the
    (Ur)×(Ur) core, in float64. O((d+k)(Ur)² + (Ur)³).
    """
    up = check_uploads(Bs, As, weights, same_rank=False, scales=scales)
    rank = max(B.shape[1] for B in up.Bs) if rank is None else check_int(rank, "rank", 1)
    w = up.w if up.scales is None else up.w * up.scales
    TB = qr_r(torch.cat([_f64(B) for B in up.Bs], dim=1))
    TA = qr_r(torch.cat([_f64(A) for A in up.As], dim=0).T)
    wcol = weights_per_column(w, [B.shape[1] for B in up.Bs]).to(TB.device)
    s = torch.linalg.svdvals((TB * wcol) @ TA.T)
    total = float(torch.linalg.vector_norm(s))
    if total == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(s[rank:])) / total
