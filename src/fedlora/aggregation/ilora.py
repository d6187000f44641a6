"""ILoRA (Zhou, Liu, Shang, arXiv 2511.16069; the method from summaries, METHODS.md "ILoRA"): QR initialisation and
QR truncation of the aggregate, in factor space.

Init, no bytes: every process QRs each base weight W0 (Householder, ``diag R ≥ 0``: :func:`qr_truncate` of W0
itself). A client of rank r_u starts from ``T_u = Q[:, :r_u] R[:r_u]`` and holds the frozen offset ``−T_u``.

Server, per adapted matrix: the global content G (rank r, ``G = s·B_g A_g`` with ``B_g`` orthonormal) and
``M = G + Σ_u w_u (s_u B_u A_u − T_u)``, T_u what client u started the round from. M is held as stacked factors
``M = L R_f`` (L = [G_L | w_u s_u B_u | −w_u T_{u,L}], R_f the matching rows) and truncated by QR in factor space:
``Q_r = qr(L R_f[:, :r])`` (diag ≥ 0; the first r input columns of M, d×r), ``G' = Q_r (Q_rᵀL) R_f`` — never d×k.
The truncation is nested: ``Q_r[:, :r_u]`` is the QR of M's first r_u columns, so client u's share
``(Q_r[:, :r_u], (Q_rᵀM)[:r_u])`` is the rank-r_u QR truncation of M. It is not the best rank-r fit: it projects
onto the span of M's first r input columns (it depends on the feature order); ``truncate="svd"`` gives ``[M]_r``.

Imports only torch and this package's helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._batch import batched, scale_each
from .registry import register_rule
from .result import Aggregate

TRUNCATIONS = ("qr", "svd")


def qr_positive(x: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR of ``x`` (reduced) with ``diag R ≥ 0``: unique where x has full column rank."""
    q, r = torch.linalg.qr(x)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(x.dtype)
    return q * sign, r * sign[:, None]


def qr_truncate(L: Tensor, R_f: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(Q_r, Q_rᵀM)`` of ``M = L R_f`` (d×n, n×k): ``Q_r`` the orthonormal QR factor of M's first ``rank`` columns
    (diag ≥ 0), so ``Q_r (Q_rᵀM)`` is M's rank-``rank`` QR truncation; never forms M."""
    if rank > min(L.shape[0], R_f.shape[1]):
        raise ValueError(f"a QR truncation to rank {rank} needs at least {rank} rows and columns, but M is {L.shape[0]}×{R_f.shape[1]}")
    Q, _ = qr_positive(L @ R_f[:, :rank])
    return Q, (Q.T @ L) @ R_f


def qr_init(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(Q[:, :r], R[:r])`` of the Householder QR ``W = QR`` (diag R ≥ 0): ILoRA's start ``T_r = Q[:, :r] R[:r]``."""
    return qr_truncate(W, torch.eye(W.shape[1], dtype=W.dtype, device=W.device), rank)


def svd_truncate(L: Tensor, R_f: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r, Σ_r V_rᵀ)`` of ``M = L R_f``: the best rank-``rank`` fit ``[M]_r``, via the QR of L (d×n) and the SVD of
    the n×k core; never forms M."""
    Q_L, R_L = torch.linalg.qr(L)
    U, S, Vh = torch.linalg.svd(R_L @ R_f, full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    B = Q_L @ U
    if B.shape[1] < rank:  # fewer components than the rank: zero columns (no direction to keep)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
        Vh = torch.cat([S[:, None] * Vh, Vh.new_zeros(rank - Vh.shape[0], Vh.shape[1])], 0)
        return B, Vh
    return B, S[:, None] * Vh


def stacked(current: tuple[Tensor, Tensor], Bs: Sequence[Tensor], As: Sequence[Tensor], w: Tensor,
            starts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(L, R_f)`` with ``L R_f = G + Σ_u w_u (B_u A_u − T_{u,L} T_{u,R})`` (every factor already at its scale)."""
    if batched(Bs[0].device):  # one broadcast product per distinct rank (_batch.scale_each), not one per client
        cols = [current[0], *scale_each(Bs, w, 1), *scale_each([T[0] for T in starts], -w, 1)]
    else:
        cols = [current[0]] + [float(wu) * B for wu, B in zip(w, Bs)] + [-float(wu) * T[0] for wu, T in zip(w, starts)]
    rows = [current[1]] + list(As) + [T[1] for T in starts]
    return torch.cat(cols, 1), torch.cat(rows, 0)


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    """Up the trained factors r_u(d+k); down the nested truncation (Q_r[:, :r_u], (Q_rᵀM)[:r_u]), r_u(d+k)."""
    return r * (d + k), r * (d + k)


@register_rule("ilora", comm=_comm, mixed_ranks=True, truncates=False)
def ilora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, current: tuple[Tensor, Tensor] | None = None,
          starts: Sequence[tuple[Tensor, Tensor]] | None = None, rank: int | None = None, truncate: str = "qr") -> Aggregate:
    """``G' = trunc_r(G + Σ_u w_u (B_u A_u − T_u))`` as ``(B, A)`` with B orthonormal (``B A = G'``).

    All in one space (the scaled product space under client scales): ``current`` the global content G as factors,
    ``starts[u]`` the factors of what client u started from. Without them G = 0 and T_u = 0 (then M = ΔW*).
    ``rank``: r (default the largest client rank); ``truncate``: ``qr`` (ILoRA) or ``svd`` ([M]_r)."""
    if truncate not in TRUNCATIONS:
        raise ValueError(f"ILoRA truncation {truncate!r} is not one of {', '.join(TRUNCATIONS)}; pass qr or svd")
    r = rank or max(A.shape[0] for A in As)
    dtype = As[0].dtype
    empty = (Bs[0].new_zeros(Bs[0].shape[0], 0), As[0].new_zeros(0, As[0].shape[1]))
    L, R_f = stacked(current or empty, Bs, As, w, starts or [empty] * len(As))
    L, R_f = L.to(torch.float64), R_f.to(torch.float64)
    B, A = (qr_truncate if truncate == "qr" else svd_truncate)(L, R_f, r)
    return Aggregate(method="ilora", B=B.to(dtype), A=A.to(dtype), info={"truncate": truncate, "stacked_rank": L.shape[1]})


def relative_error(L: Tensor, R_f: Tensor, B: Tensor, A: Tensor) -> float:
    """``‖M − B A‖_F / ‖M‖_F`` with ``M = L R_f`` (for tests and diagnostics; forms d×k)."""
    M = L.double() @ R_f.double()
    return float(torch.linalg.norm(M - B.double() @ A.double()) / torch.linalg.norm(M).clamp_min(1e-300))


# ---- control variates (``--ilora-cv scaffold``; METHODS.md "ILoRA", client) -------------------------------------
def rebase(cB: Tensor, cA: Tensor, B_new: Tensor, B_old: Tensor) -> tuple[Tensor, Tensor]:
    """Variates of a factor pair expressed in the basis ``B_old`` (d×ρ, orthonormal columns) carried to ``B_new``
    (d×ρ, orthonormal), by the projection ``P = B_newᵀ B_old`` (ρ×ρ) the factors themselves move by: where the spans
    agree ``B_old = B_new P`` with P orthogonal, so a product ``B_old A = B_new (P A)`` and a direction on A becomes
    ``P·dA``, one on B ``dB·Pᵀ`` (an exact change of coordinates); where they differ, P is a contraction and the part
    of the variates outside the new span is dropped. Returns ``(cB Pᵀ, P cA)`` in the inputs' dtype (computed in float64)."""
    P = B_new.to(torch.float64).T @ B_old.to(torch.float64)
    return (cB.to(torch.float64) @ P.T).to(cB.dtype), (P @ cA.to(torch.float64)).to(cA.dtype)


def pad_to(t: Tensor, rank: int, dim: int) -> Tensor:
    """``t`` with zero components appended along ``dim`` up to ``rank``."""
    if t.shape[dim] >= rank:
        return t
    shape = list(t.shape)
    shape[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def server_variate(c: Tensor, deltas: Sequence[Tensor], clients: int, dim: int) -> Tensor:
    """SCAFFOLD's server step per rank segment: ``c + (1/N) Σ_u pad(Δc_u)``, each client's ``Δc_u`` (rank r_u along
    ``dim``) padded with zeros to c's rank, N the total number of clients (not the round's)."""
    if clients < 1:
        raise ValueError("the control-variate update needs the run's number of clients (N ≥ 1)")
    total = sum((pad_to(d.to(torch.float64), c.shape[dim], dim) for d in deltas), torch.zeros_like(c, dtype=torch.float64))
    return (c.to(torch.float64) + total / clients).to(c.dtype)


def client_variate(c_u: Tensor, c: Tensor, x_start: Tensor, x_end: Tensor, steps: int, lr: float) -> Tensor:
    """SCAFFOLD option II in AdamW's step space: ``c_u⁺ = c_u − c + (x_start − x_end)/(Kη)``; after K steps
    ``x ← x − η(u_k + c − c_u)`` this is the mean of the uncorrected steps u_k = m̂/(√v̂+ε) (η the step's lr)."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"the control variate needs K ≥ 1 local steps and an lr > 0 (got K={steps}, lr={lr})")
    move = (x_start.to(torch.float64) - x_end.to(torch.float64)) / (steps * lr)
    return (c_u.to(torch.float64) - c.to(torch.float64) + move).to(x_end.dtype)
