"""FedLEASE (Wang, Bian, Zhang, Xu, NeurIPS 2025, arXiv 2509.15087; METHODS.md, wave 3; the method from summaries):
clients clustered once by their round-0 LoRA, one LoRA expert per cluster, a per-client router over the experts.

- Distance (METHODS.md): ``d(u,v) = (1/|L|) Σ_l (1 − cos(vec B_u^l, vec B_v^l))``, ``d(u,u) = 0``. Our choice: a
  zero B (a client whose round 0 moved nothing) has cosine 0 with everything (distance 1), not NaN.
- Clustering: agglomerative, average linkage on the precomputed distances (scipy), for K = 2..min(K_max, N−1), K*
  by the silhouette (scikit-learn's ``silhouette_score`` where installed, else :func:`silhouette`, the same
  definition: a client alone in its cluster scores 0); ties go to the smaller K; N ≤ 2 → K = 1. Labels are renumbered
  in order of first appearance (the cluster of client 0 is 0), so they do not depend on scipy's numbering.
- Expert init: expert j = the w-weighted mean, renormalised over its members, of their round-0 factors, B and A both
  (the public code's second ``replace`` overwrites the first and leaves A uninitialised).
- Routing (the structure's, :mod:`fedlora.adapters.structures`), client u in cluster c, M experts:
  ``p = softmax(G_u x)`` over 2M−1 slots; slots 0..M−1 map to expert c,
  slots M..2M−2 to the other experts in index order; T = the top-M slots (ties: the lower slot); ``ω_e = Σ_{j∈T,
  map(j)=e} p_j``, not renormalised. Expert c is always chosen; with a zero router only c, with weight M/(2M−1).
- Server rule (one expert, one adapted matrix): FedIT over the round's sampled members of its cluster, weights
  renormalised over them; the protocol leaves experts without a sampled member unchanged. O(U·r(d+k)).

Bytes per client per adapted matrix: up ``r(d+k)`` (its cluster's expert), down ``M·r(d+k)`` (every expert).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import combine
from .registry import register_rule
from .result import Aggregate

__all__ = ["cluster_clients", "expert_init", "fedlease", "lease_distances", "silhouette", "silhouette_score"]

MAX_EXPERTS = 8  # METHODS.md: K = 2..min(8, N−1)


def lease_distances(Bs: Sequence[Sequence[Tensor]]) -> Tensor:
    """N×N float64 distances from ``Bs[u][l]``, client u's B of adapted layer l (the same layers for every client)."""
    n = len(Bs)
    if n == 0 or any(len(b) != len(Bs[0]) for b in Bs) or not Bs[0]:
        raise ValueError("FedLEASE's distance needs every client's B for the same, non-empty list of layers")
    total = torch.zeros(n, n, dtype=torch.float64)
    for layer in range(len(Bs[0])):
        V = torch.stack([b[layer].detach().reshape(-1).double().cpu() for b in Bs])
        norms = V.norm(dim=1)
        unit = V / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]  # a zero B stays zero: cosine 0
        total += 1.0 - unit @ unit.T
    D = (total / len(Bs[0])).clamp_min(0.0)
    D = (D + D.T) / 2
    D.fill_diagonal_(0.0)
    return D


def silhouette(D: Tensor, labels: Sequence[int]) -> float:
    """Mean silhouette of ``labels`` on precomputed distances ``D``: ``s_i = (b_i − a_i)/max(a_i, b_i)``, a_i the mean
    distance to the others of its cluster, b_i the least mean distance to another cluster; 0 for a singleton."""
    lab = torch.as_tensor(list(labels))
    D = D.double()
    scores = []
    for i in range(len(lab)):
        same = lab == lab[i]
        if int(same.sum()) == 1:
            scores.append(0.0)
            continue
        a = float(D[i, same].sum()) / (int(same.sum()) - 1)
        b = min(float(D[i, lab == c].mean()) for c in lab.unique().tolist() if c != int(lab[i]))
        top = max(a, b)
        scores.append(0.0 if top == 0 else (b - a) / top)
    return sum(scores) / len(scores)


def silhouette_score(D: Tensor, labels: Sequence[int]) -> float:
    """The silhouette of ``labels``: scikit-learn's where installed (not a dependency), else :func:`silhouette`."""
    try:
        from sklearn.metrics import silhouette_score as sk
    except ImportError:
        return silhouette(D, labels)
    return float(sk(D.double().numpy(), list(labels), metric="precomputed"))


def _renumber(labels: Sequence[int]) -> list[int]:
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]


def cluster_clients(D: Tensor, max_k: int = MAX_EXPERTS) -> tuple[list[int], dict[int, float]]:
    """(labels, silhouette per K tried): average-linkage agglomerative clustering of the precomputed ``D`` for
    K = 2..min(max_k, N−1), the K with the largest silhouette (ties: the smaller K); N ≤ 2 or max_k < 2 → one cluster."""
    n = D.shape[0]
    top = min(max_k, n - 1)
    if top < 2:
        return [0] * n, {}
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    tree = linkage(squareform(D.double().numpy(), checks=False), method="average")
    best, scores = None, {}
    for k in range(2, top + 1):
        labels = _renumber(fcluster(tree, t=k, criterion="maxclust").tolist())
        if len(set(labels)) < 2:  # ties in the tree can merge below k clusters; nothing to score
            continue
        scores[k] = silhouette_score(D, labels)
        if best is None or scores[k] > scores[best[0]]:
            best = (k, labels)
    return (best[1] if best else [0] * n), scores


def expert_init(Bs: Sequence[Tensor], As: Sequence[Tensor], w: Tensor, labels: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Per cluster j = 0..M−1: ``(Σ_{u∈j} w_u B_u / Σ_{u∈j} w_u, same for A)``, one adapted matrix."""
    w = torch.as_tensor(w, dtype=torch.float64)
    out = []
    for j in range(max(labels) + 1):
        members = [u for u, lab in enumerate(labels) if lab == j]
        coef = w[members] / w[members].sum()
        out.append((combine([Bs[u] for u in members], coef), combine([As[u] for u in members], coef)))
    return out


def _comm(d: int, k: int, r: int, U: int, experts: int = 1) -> tuple[int, int]:
    """Up: the client's cluster's expert; down: every expert."""
    return r * (d + k), experts * r * (d + k)


@register_rule("fedlease", comm=_comm)
def fedlease(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, experts: int = 1) -> Aggregate:
    """One expert of one adapted matrix: FedIT over the uploads given (its cluster's sampled members), renormalised
    (``experts``: how many the model has, for the byte count only)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    coef = w / w.sum()
    return Aggregate(method="fedlease", B=combine(Bs, coef), A=combine(As, coef), p=coef, q=coef.clone())
