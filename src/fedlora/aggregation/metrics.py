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

from ._common import GRAM_LIMIT_LOG10, check_int, check_uploads, combine, log10_abs, log10_sum, max_abs, qr_r, sq_norm_log10, weights_per_column
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
    ``ΔW* = 0`` but ``ΔŴ ≠ 0``, so it is never NaN: uploads or a result large enough to overflow float64 on the way
    (entries ~1e70 and up at typical sizes) raise a ``ValueError`` instead.
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
    _check_result(up.Bs, up.As, w, result, B_res)

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


def _check_result(Bs: Sequence[Tensor], As: Sequence[Tensor], w: Tensor, result: Aggregate, B_res: Tensor) -> None:
    """The uploads passed ``check_uploads``; refuse a result whose factors are not finite, or so large that the QRs
    and the product below would overflow float64 with them (ρ would come out NaN). One ``aminmax`` per factor.

    ``L R = Σ_b L_b R_b`` over the blocks (each client's ``w_u B_u``, ``A_u``; ``−B̂``, ``Â``; the residual), so
    ``‖L R‖_F ≤ Σ_b ‖L_b‖_F ‖R_b‖_F``; the QRs see ``‖L‖_F`` and ``‖R‖_F`` alone. Pairing the blocks matters:
    FedSVD's ``B̂`` carries the whole product's scale and its ``Â`` none, which ``‖L‖_F·‖R‖_F`` would overstate."""
    pairs = [("B", B_res, "A", result.A)]
    if result.base_delta_factors is not None:
        pairs.append(("residual L", result.base_delta_factors[0], "residual R", result.base_delta_factors[1]))
    blocks = [((log10_abs(max_abs(B)) + log10_abs(float(c)), B.numel()), (log10_abs(max_abs(A)), A.numel())) for B, A, c in zip(Bs, As, w)]
    largest = ("", -math.inf)
    for what_L, L, what_R, R in pairs:
        pair = []
        for what, t in ((what_L, L), (what_R, R)):
            m = max_abs(t)
            if not math.isfinite(m):
                raise ValueError(f"this {result.method} result's {what} contains NaN or Inf; pass a result returned by aggregate() on these uploads")
            pair.append((log10_abs(m), t.numel()))
            largest = max(largest, (what, log10_abs(m)), key=lambda x: x[1])
        blocks.append(tuple(pair))
    product = 2.0 * log10_sum([(sq_norm_log10([lb]) + sq_norm_log10([rb])) / 2.0 for lb, rb in blocks])  # ≥ log10 ‖L R‖_F²
    bound = max(sq_norm_log10([lb for lb, _ in blocks]), sq_norm_log10([rb for _, rb in blocks]), product)
    if bound > GRAM_LIMIT_LOG10:
        what, lg = largest
        raise ValueError(
            f"this {result.method} result's {what} reaches |entry| ~1e{lg:.0f}, so the products divergence forms in float64 would overflow "
            f"(squared norms up to ~1e{bound:.0f}, above the ~1e{GRAM_LIMIT_LOG10:.0f} float64 allows); pass a result returned by "
            "aggregate() on these uploads, or rescale them"
        )


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
