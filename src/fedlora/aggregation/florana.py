"""FLoRA-NA (Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in Federated
Low-Rank Adaptation", arXiv:2509.26399, 2025): the best coefficient combination of the clients' factors.

``B̂ = Σ p_u B_u``, ``Â = Σ q_u A_u`` with ``(p, q) = argmin ‖ΔW* − B̂Â‖_F²``, ``ΔW* = Σ w_u B_u A_u``. It
broadcasts exactly FedIT's bytes but follows ΔW* more closely. The paper learns p, q by gradient steps;
this module solves for them exactly by alternating least squares in the Gram space:

* For fixed q the objective is a linear least-squares problem in p (and vice versa). With the Gram blocks
  ``GB_uv = B_uᵀB_v`` and ``GA_ab = A_aA_bᵀ`` (r×r each) its normal equations ``H p = g`` are
  ``H_uv = tr(GB_uv ÂÂᵀ)`` with ``ÂÂᵀ = Σ_ab q_a q_b GA_ab`` and ``g_u = Σ_v w_v tr(GB_uv A_vÂᵀ)`` with
  ``A_vÂᵀ = Σ_b q_b GA_vb`` — so one sweep costs O(U²r² + U³) and nothing d×k is ever formed. The Grams
  themselves cost O((d+k)(Ur)²), once, in float64.
* Each half-step is an exact minimiser (``lstsq``, so singular systems from all-zero B or duplicated
  clients give the minimum-norm solution), hence the objective never increases. A start stops when a sweep
  lowers the objective by at most ``tol`` relative (or it reaches the float64 noise floor of the Gram
  identity, ~1e-14·‖ΔW*‖²), or after ``max_iter`` sweeps.
* The first start is the FedIT point ``p = q = w``, so the result is never worse than FedIT; if the solver
  cannot improve on it, the FedIT point itself is returned. The objective is a quartic with local minima
  (alternating from FedIT alone stops in a worse one for a few percent of random heterogeneous clients),
  so ``restarts`` further seeded random starts run in the same batched solve and the best is kept.
* Scale convention: ``(c·p, q/c)`` give the same ``B̂Â``; we report ``Σ_u q_u = 1`` (so a shared A
  comes back unchanged), or ``‖q‖₁ = 1`` when ``|Σ q| < 1e-6·‖q‖₁``.

Cost: O((d+k)(Ur)²) for the Grams plus O(S·(U²r² + U³)) per sweep for S = 1 + restarts starts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_int, check_tol, combine, gram, stack
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate

_FLOOR = 64 * torch.finfo(torch.float64).eps  # relative noise floor of the Gram-form objective


class _Side:
    """The Gram blocks of one factor, laid out once so that each half-step is three small matmuls."""

    def __init__(self, G: Tensor) -> None:  # G: (U, r, U, r) blocks G_uv
        U, r = G.shape[0], G.shape[1]
        self.U, self.r = U, r
        as_other = G.permute(0, 1, 3, 2).contiguous()  # [a, i, j, b]
        self.by_coeff = as_other.view(U * r * r, U)
        as_self = G.permute(0, 2, 1, 3).contiguous()  # [u, v, i, j]
        self.pairs = as_self.view(U * U, r * r)
        self.rows = as_self.view(U, U * r * r)


def _normal_equations(me: _Side, other: _Side, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``H x = g`` for the coefficients x of one factor, the other fixed at coefficients ``c`` (S×U).

    For the p-step (me = B, other = A): ``V_v = A_vÂᵀ = Σ_b c_b GA_vb``, ``ÂÂᵀ = Σ_a c_a V_a``,
    ``H_uv = tr(GB_uv ÂÂᵀ)``, ``g_u = Σ_v w_v tr(GB_uv V_v)``. O(S·U²r²).
    """
    U, r, S = me.U, me.r, c.shape[0]
    V = (other.by_coeff @ c.T).view(U, r, r, S)  # V[a, i, j, s]
    gram_hat = (V * c.T[:, None, None, :]).sum(0)  # ÂÂᵀ[i, j, s]
    H = (me.pairs @ gram_hat.transpose(0, 1).reshape(r * r, S)).view(U, U, S).permute(2, 0, 1)
    g = me.rows @ (V.transpose(1, 2) * w[:, None, None, None]).reshape(U * r * r, S)
    return H, g.T


def _objective(ideal_sq: Tensor, H: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """‖ΔW* − B̂Â‖² = ‖ΔW*‖² − 2gᵀx + xᵀHx for each start (rows of x)."""
    return ideal_sq - 2 * (g * x).sum(-1) + torch.einsum("su,suv,sv->s", x, H, x)


def _solve(H: Tensor, g: Tensor) -> Tensor:
    return torch.linalg.lstsq(H, g.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _fix_scale(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, str]:
    l1 = float(q.abs().sum())
    if l1 == 0.0:
        return torch.zeros_like(p), q, "zero"
    total = float(q.sum())
    if abs(total) >= 1e-6 * l1:
        return p * total, q / total, "sum(q)=1"
    return p * l1, q / l1, "l1(q)=1"


@register_rule("florana", comm=factors_comm)
def florana(
    Bs: list[Tensor],
    As: list[Tensor],
    w: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    restarts: int = 8,
    seed: int = 0,
) -> Aggregate:
    tol = check_tol(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", 0)
    restarts = check_int(restarts, "restarts", 0)
    seed = check_int(seed, "seed", 0)
    U, r = len(Bs), Bs[0].shape[1]

    GB = gram(stack(Bs, dim=1)).view(U, r, U, r)  # B_catᵀ B_cat
    GA = gram(stack(As, dim=0), rows=True).view(U, r, U, r)  # A_cat A_catᵀ
    ideal_sq = torch.einsum("u,uivj,v,vjui->", w, GB, w, GA)  # ‖ΔW*‖²
    GB, GA = _Side(GB), _Side(GA)

    gen = torch.Generator().manual_seed(seed)
    q = torch.cat([w[None], torch.randn(restarts, U, generator=gen, dtype=torch.float64)])
    H, g = _normal_equations(GB, GA, q, w)
    f_fedit = float(_objective(ideal_sq, H[:1], g[:1], w[None]))
    history = [f_fedit]
    info = {"iterations": 0, "objective": history, "ideal_sq_norm": float(ideal_sq), "start": 0}

    def fedit_point(converged: bool) -> Aggregate:
        info.update(converged=converged, fell_back_to_fedit=True, scale="sum(q)=1")
        return Aggregate(
            method="florana", B=combine(Bs, w), A=combine(As, w), p=w.clone(), q=w.clone(), info=info
        )

    floor = _FLOOR * float(ideal_sq)
    if f_fedit <= floor:  # FedIT is already exact to rounding (one client, identical clients, all B = 0)
        return fedit_point(converged=True)

    best_f = torch.full((q.shape[0],), float("inf"), dtype=torch.float64)
    best_f[0] = f_fedit
    best_p, best_q = w[None].repeat(q.shape[0], 1), q.clone()
    active = torch.ones(q.shape[0], dtype=torch.bool)
    for sweep in range(1, max_iter + 1):
        p = _solve(H, g)
        H, g = _normal_equations(GA, GB, p, w)
        q = _solve(H, g)
        f = _objective(ideal_sq, H, g, q)
        better = f < best_f
        stalled = ~better | (best_f - f <= tol * best_f.abs()) | (f <= floor)
        best_p[better], best_q[better], best_f[better] = p[better], q[better], f[better]
        active &= ~stalled
        history.append(float(best_f[0]))
        info["iterations"] = sweep
        if not active.any():
            break
        H, g = _normal_equations(GB, GA, q, w)
    info["converged"] = not bool(active.any())

    s = int(torch.argmin(best_f))
    if not float(best_f[s]) < f_fedit:
        return fedit_point(converged=info["converged"])
    p, q, scale = _fix_scale(best_p[s], best_q[s])
    info.update(start=s, fell_back_to_fedit=False, scale=scale, objective_best=float(best_f[s]))
    return Aggregate(method="florana", B=combine(Bs, p), A=combine(As, q), p=p, q=q, info=info)
