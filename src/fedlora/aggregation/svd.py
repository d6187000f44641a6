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

**Many clients.** That cost is quadratic in the number of clients U. Above ``EXACT_MAX_COLUMNS`` stacked columns
(``solver="auto"``) the rule switches to ``sketch.randomized_svd``: a randomized range finder with power
iterations on the implicit ``ΔW* = B_cat W A_cat``, O((d+k)·Ur·ℓ) per product for ℓ = r + 10, a few
products in all, with ρ within ``tol`` (default 1%) of the Eckart–Young bound by its a-posteriori estimate
(measured against the exact bound in the tests and ``benchmarks/bench_aggregation.py --scale``). ``solver="exact"``
or ``"randomized"`` forces a path; ``info["solver"]`` says which ran. Below the threshold results stay exact to
float64 rounding, as above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_int, check_tol, gram, gram_root, stack, weights_per_column
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate
from .sketch import Ideal, randomized_svd

# Stacked columns n = Σ r_u above which ``solver="auto"`` takes the randomized path. Measured on LLaMA-7B-shaped
# matrices (4096², r = 16, float32, 2 cores; benchmarks/bench_aggregation.py --scale): the exact path costs
# O((d+k)·n²) in float64, the randomized one four to six float32 products of width ℓ = r + 10; they cross near
# n = 256.
EXACT_MAX_COLUMNS = 256
SOLVERS = ("auto", "exact", "randomized")


def check_solver(solver: object) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver is {solver!r}; pass one of {', '.join(map(repr, SOLVERS))}")
    return str(solver)


@register_rule("svd", comm=factors_comm)
def svd(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, rank: int | None = None, solver: str = "auto",
        tol: float = 0.01, seed: int = 0) -> Aggregate:
    r = Bs[0].shape[1]
    return truncated_svd(Bs, As, w, r if rank is None else check_int(rank, "rank", 1), method="svd", solver=solver,
                         tol=tol, seed=seed)


def truncated_svd(Bs: list[Tensor], As: list[Tensor], w: Tensor, rank: int, *, method: str, solver: str = "auto",
                  tol: float = 0.01, seed: int = 0) -> Aggregate:
    """``[ΔW*]_rank`` split as ``U Σ^{1/2}``, ``Σ^{1/2} Vᵀ``; clients may have different ranks (FlexLoRA).

    ``solver``: ``"exact"`` (the Gram path), ``"randomized"`` (``sketch.randomized_svd``, ρ ≤ (1 + tol)·ρ_min
    estimated, seeded by ``seed``), or ``"auto"``: exact up to ``EXACT_MAX_COLUMNS`` stacked columns."""
    solver, tol, seed = check_solver(solver), check_tol(tol, "tol"), check_int(seed, "seed", 0)
    n = sum(B.shape[1] for B in Bs)
    if solver == "randomized" or (solver == "auto" and n > EXACT_MAX_COLUMNS and rank < n):
        return _randomized(Bs, As, w, rank, method=method, tol=tol, seed=seed)
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
    return Aggregate(method=method, B=B_hat, A=A_hat, info={"singular_values": lam.sqrt(), "rank": keep, "solver": "exact"})


def _randomized(Bs: list[Tensor], As: list[Tensor], w: Tensor, rank: int, *, method: str, tol: float, seed: int) -> Aggregate:
    """``[ΔW*]_rank`` from ``randomized_svd``: linear in the number of clients, on the uploads' device."""
    d, k, dtype = Bs[0].shape[0], As[0].shape[1], Bs[0].dtype
    res = randomized_svd(Ideal.stack(Bs, As, w), rank, tol=tol, seed=seed)
    c = min(rank, res.S.numel())
    root = res.S[:c].sqrt()
    B_hat = (res.U[:, :c] * root).to(dtype)
    A_hat = (root[:, None] * res.Vh[:c]).to(dtype)
    if c < rank:  # fewer stacked columns than the rank: pad with zeros so the shapes stay d×rank, rank×k
        B_hat = torch.cat([B_hat, B_hat.new_zeros(d, rank - c)], dim=1)
        A_hat = torch.cat([A_hat, A_hat.new_zeros(rank - c, k)], dim=0)
    keep = int((res.S[:c] > 0).sum())
    info = {"singular_values": res.S, "rank": keep, "solver": "randomized", "power_iterations": res.power_iterations,
            "converged": res.converged, "sketch": res.sketch, "residual_sq_estimate": res.residual_sq, "tol": tol}
    return Aggregate(method=method, B=B_hat, A=A_hat, info=info)
