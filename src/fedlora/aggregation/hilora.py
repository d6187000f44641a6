"""HiLoRA (Peng et al., CVPR 2026): the math of its root and cluster tiers and of its clustering.

- **Root rule** (also each cluster's): ``M = Σ w_u s B_u A_u`` and its best rank-r approximation from the
  factor-space SVD of :mod:`fedlora.aggregation.svd` (never d×k), split with an orthonormal B: ``B_r = U_r``,
  ``A_r = Σ_r V_rᵀ / s``, so ``s B_r A_r = [M]_r``. The rule works in the unscaled product space
  (``B_rA_r = [Σ w_u B_uA_u]_r``): one rank, one s, which cancels. Where M has numerical rank below r the extra
  columns of B_r (rows of A_r) are zero.
- **Tracked B** (server, per client and module): ``B̄_u ← normalise(λB̄_u + (1−λ)B_u/‖B_u‖_F)``, the first one
  ``B_u/‖B_u‖_F``; a zero B_u leaves B̄_u as it was (our choice: it has no direction).
- **Clustering** at the switch to the cluster stage: ``U_u`` the top-r left singular vectors of B̄_u, the
  distance ``d_uv = mean over modules of 1 − ‖U_uᵀU_v‖_F²/r``, the affinity ``S = exp(−d²/2σ²)`` with σ the
  median off-diagonal distance, ``K* = argmax_{K∈[2, min(10, N−1)]} (λ_{K+1} − λ_K)`` over the eigenvalues of the
  normalised Laplacian ``I − D^{-1/2} S D^{-1/2}`` in ascending order (λ_1 = 0), then NJW spectral clustering:
  the K* eigenvectors of the smallest eigenvalues, rows normalised, seeded k-means. Our choices: the affinity's
  diagonal is 0 (NJW's A_ii = 0); N ≤ 2 clients, or all distances zero, give one cluster; ties in the eigengap go
  to the smaller K; k-means is k-means++ seeded, 10 starts, the lowest inertia kept; clusters are numbered by
  their first member in client order.
- **Orthogonality penalty**: ``‖PᵀB‖_F²`` (``γ_c‖B_rᵀB‖²``, ``γ_l‖B_cᵀB_l‖²``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_int
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate
from .svd import truncated_svd

MAX_CLUSTERS = 10
KMEANS_STARTS = 10


@register_rule("hilora", comm=factors_comm)
def hilora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, rank: int | None = None, solver: str = "auto",
           tol: float = 0.01, seed: int = 0) -> Aggregate:
    """``B = U_r`` (orthonormal), ``A = Σ_r V_rᵀ``: ``BA = [Σ w_u B_uA_u]_r`` (the root rule; each cluster's)."""
    r = Bs[0].shape[1] if rank is None else check_int(rank, "rank", 1)
    agg = truncated_svd(Bs, As, w, r, method="hilora", solver=solver, tol=tol, seed=seed)
    keep = int(agg.info["rank"]) if agg.info.get("solver") == "exact" else int(min(r, agg.info["singular_values"].numel()))
    sigma = agg.info["singular_values"][:keep].to(torch.float64)
    root = torch.zeros(r, dtype=torch.float64, device=sigma.device)
    root[:keep] = sigma.sqrt()
    inv = torch.where(root > 0, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(root))
    B = (agg.B.to(torch.float64) * inv.to(agg.B.device)).to(agg.B.dtype)  # U Σ^{1/2} · Σ^{-1/2}
    A = (agg.A.to(torch.float64) * root.to(agg.A.device)[:, None]).to(agg.A.dtype)  # Σ^{1/2} Vᵀ · Σ^{1/2}
    return Aggregate(method="hilora", B=B, A=A, info=agg.info)


def track(previous: Tensor | None, B: Tensor, lam: float = 0.9) -> Tensor | None:
    """One step of the server's tracked direction ``B̄_u`` of a client's B (module docstring)."""
    norm = torch.linalg.matrix_norm(B.to(torch.float64))
    if norm == 0:
        return previous
    x = B.to(torch.float64) / norm
    if previous is None:
        return x
    y = lam * previous.to(torch.float64) + (1 - lam) * x
    return y / torch.linalg.matrix_norm(y)


def left_basis(B: Tensor, rank: int) -> Tensor:
    """The top-``rank`` left singular vectors of B (d×rank, orthonormal)."""
    U, _, _ = torch.linalg.svd(B.to(torch.float64), full_matrices=False)
    return U[:, :rank]


def subspace_distances(tracked: list[dict[str, Tensor]], rank: int) -> Tensor:
    """``d_uv`` = mean over modules of ``1 − ‖U_uᵀU_v‖_F²/r`` (N×N, zero diagonal, symmetric)."""
    n = len(tracked)
    modules = sorted(tracked[0]) if n else []
    dist = torch.zeros(n, n, dtype=torch.float64)
    for m in modules:
        bases = [left_basis(t[m], rank) for t in tracked]
        stack = torch.stack(bases)  # N×d×r
        overlap = torch.einsum("udi,vdj->uvij", stack, stack).pow(2).sum((-1, -2)) / rank
        dist += 1.0 - overlap
    dist = (dist / max(len(modules), 1)).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return (dist + dist.T) / 2


def affinity(dist: Tensor) -> Tensor:
    """``S = exp(−d²/2σ²)``, σ the median off-diagonal distance, diagonal 0 (NJW)."""
    n = dist.shape[0]
    off = dist[~torch.eye(n, dtype=torch.bool)]
    sigma = float(torch.quantile(off, 0.5)) if off.numel() else 0.0  # the mean of the middle two for an even count
    if sigma <= 0:
        S = torch.ones_like(dist)
    else:
        S = torch.exp(-dist.pow(2) / (2 * sigma**2))
    S.fill_diagonal_(0.0)
    return S


def laplacian_spectrum(S: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the normalised Laplacian ``I − D^{-1/2} S D^{-1/2}``."""
    deg = S.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(torch.finfo(S.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    L = torch.eye(S.shape[0], dtype=S.dtype) - inv[:, None] * S * inv[None, :]
    return torch.linalg.eigh((L + L.T) / 2)


def eigengap_k(eigenvalues: Tensor, n: int) -> int:
    """``K* = argmax_{K∈[2, min(10, N−1)]} (λ_{K+1} − λ_K)`` (1-based λ, ascending); 1 when the range is empty."""
    top = min(MAX_CLUSTERS, n - 1)
    if top < 2:
        return 1
    gaps = [float(eigenvalues[K] - eigenvalues[K - 1]) for K in range(2, top + 1)]
    return 2 + max(range(len(gaps)), key=lambda i: (gaps[i], -i))


def kmeans(X: Tensor, K: int, seed: int, starts: int = KMEANS_STARTS, iterations: int = 100) -> Tensor:
    """Seeded k-means++ with ``starts`` restarts; the labels of the lowest inertia."""
    gen = torch.Generator().manual_seed(int(seed))
    best, best_inertia = None, float("inf")
    n = X.shape[0]
    for _ in range(starts):
        centres = X[torch.randint(n, (1,), generator=gen)]
        while centres.shape[0] < K:
            d2 = torch.cdist(X, centres).pow(2).min(1).values
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=X.dtype)
            centres = torch.cat([centres, X[torch.multinomial(p, 1, generator=gen)]])
        labels = torch.cdist(X, centres).argmin(1)
        for _ in range(iterations):
            centres = torch.stack([X[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(K)])
            new = torch.cdist(X, centres).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(torch.cdist(X, centres).pow(2).gather(1, labels[:, None]).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def canonical(labels: Tensor) -> list[int]:
    """Labels renumbered by first appearance (cluster 0 holds client 0)."""
    order: dict[int, int] = {}
    return [order.setdefault(int(x), len(order)) for x in labels]


def spectral_clusters(tracked: list[dict[str, Tensor]], rank: int, seed: int) -> tuple[list[int], dict]:
    """Cluster the clients by the subspaces of their tracked B̄ (module docstring): (labels, diagnostics: ``k`` = K*,
    ``distances`` D, and where K* came from the eigengap ``eigenvalues`` and ``eigengap`` λ_{K*+1} − λ_{K*})."""
    n = len(tracked)
    dist = subspace_distances(tracked, rank)
    if n <= 2 or float(dist.max()) == 0.0:
        return [0] * n, {"k": 1, "distances": dist}
    lam, vecs = laplacian_spectrum(affinity(dist))
    K = eigengap_k(lam, n)
    X = vecs[:, :K]
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min(1e-12)
    gap = float(lam[K] - lam[K - 1]) if K < n else None  # λ_{K*+1} − λ_{K*}
    return canonical(kmeans(X, K, seed)), {"k": K, "distances": dist, "eigenvalues": lam, "eigengap": gap}


def orthogonality(P: Tensor, B: Tensor) -> Tensor:
    """``‖PᵀB‖_F²`` (differentiable in B)."""
    return (P.to(B.dtype).T @ B).pow(2).sum()
