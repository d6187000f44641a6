"""Fed-HeLLo (Zhang et al., TNNLS 2025, arXiv 2506.12213; METHODS.md, wave 3): each client trains the LoRA of only
the transformer blocks allocated to it this round; the server averages each block over the clients that trained it.

Server, one adapted matrix of block l with trainers ``S_l ≠ ∅``: ``B = Σ_{S_l} w_u B_u / Σ_{S_l} w_u``, A likewise
(the official ``weighted_average_lora_depthfl``); a block nobody trained keeps its factors (the protocol does not
call the rule for it). With every client training every block it is FedIT. O(U·r(d+k)).

Allocation (RGD-HLA): each round and client, ``L_u`` distinct blocks drawn without replacement with probabilities
``p_l`` from a generator seeded by (run seed, round, client). Patterns: ``bottleneck`` — the official 12-block
``layer_prob`` [3,3,3,2,2,1,1,1,2,3,3,3]/27 resampled to L blocks by nearest index (our choice: block l takes entry
``round(l·11/(L−1))``); ``uniform``; ``triangle`` ``p_l ∝ l+1``; ``inverted`` ``p_l ∝ L−l`` (our reading of the
paper's names). ``fim`` (FIM-HLA): the probabilities :func:`fim_probabilities` gives from the clients' per-block
Fisher scores (:func:`block_scores`): a seeded 1-D k-means with 3 clusters, levels sorted by centre, weights 1, 2, 3.

Blocks are read from the module name exactly: the first dotted component that is an integer
(``bert.encoder.layer.10.attention.self.query`` is block 10), never by substring (the official code's
``str(nd) in n`` freezes blocks 10 and 11 with block 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import combine
from .registry import register_rule
from .result import Aggregate

__all__ = ["PATTERNS", "allocate", "block_of", "block_scores", "fedhello", "fim_probabilities", "kmeans_1d", "layer_probabilities"]

PATTERNS = ("bottleneck", "uniform", "triangle", "inverted", "fim")
FIXED = PATTERNS[:4]  # the patterns that need no scores; fim starts from the default, bottleneck
LEVEL_WEIGHTS = (1.0, 2.0, 3.0)  # the official 1/27, 2/27, 1/9 per level, up to the common factor 1/27
BOTTLENECK = (3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3)  # the official 12-block layer_prob, over 27


def block_of(module: str) -> int | None:
    """The transformer block of an adapted module: its first dotted name component that is an integer (None: in no
    numbered block)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_probabilities(L: int, pattern: str) -> Tensor:
    """``p_l`` over L blocks (float64, sums to 1); ``fim`` has no fixed pattern (:func:`fim_probabilities`)."""
    if pattern not in FIXED:
        raise ValueError(f"Fed-HeLLo pattern {pattern!r} has no fixed probabilities; choose one of {', '.join(FIXED)} "
                         "(fim's come from the clients' scores: fim_probabilities)")
    if L < 1:
        raise ValueError("Fed-HeLLo needs at least one block to allocate; adapt layers inside numbered blocks")
    n = len(BOTTLENECK)
    weights = {
        "bottleneck": [BOTTLENECK[int(l * (n - 1) / (L - 1) + 0.5) if L > 1 else 0] for l in range(L)],
        "uniform": [1.0] * L,
        "triangle": [l + 1.0 for l in range(L)],
        "inverted": [float(L - l) for l in range(L)],
    }[pattern]
    p = torch.tensor(weights, dtype=torch.float64)
    return p / p.sum()


def allocate(blocks: Sequence[int], budget: int, probs: Tensor, seed: int, rnd: int, cid: int) -> list[int]:
    """The ``budget`` distinct blocks (of ``blocks``, sorted) client ``cid`` trains in round ``rnd``, drawn without
    replacement with probabilities ``probs`` from a generator seeded by (``seed``, round, client); all of them when
    the budget covers them."""
    if budget >= len(blocks):
        return list(blocks)
    gen = torch.Generator().manual_seed(_seed("fedhello", int(seed), int(rnd), int(cid)))
    picked = torch.multinomial(probs.to(torch.float64), budget, replacement=False, generator=gen)
    return sorted(blocks[i] for i in picked.tolist())


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def block_scores(grads: Sequence[dict[str, Tensor]], blocks: dict[str, int], order: Sequence[int]) -> Tensor:
    """FIM-HLA's per-block scores ``F_l = Σ_{tensors t of block l} ‖(1/n) Σ_i g_{i,t}²‖_F`` from n examples' gradients
    ``grads[i][t]`` (each a dict by tensor name), ``blocks[t]`` the block of tensor t; float64, in the order of the
    blocks ``order`` (a block without tensors scores 0)."""
    if not grads:
        raise ValueError("FIM scores need at least one example's gradients")
    n = len(grads)
    out = torch.zeros(len(order), dtype=torch.float64)
    where = {b: i for i, b in enumerate(order)}
    for name, block in blocks.items():
        fisher = sum(g[name].to(torch.float64) ** 2 for g in grads) / n
        out[where[block]] += torch.linalg.norm(fisher)
    return out


def kmeans_1d(x: Tensor, k: int, seed: int, iters: int = 100, restarts: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of the values ``x`` (1-D), seeded: ``restarts`` runs (sklearn's n_init = 10), each from k
    distinct values drawn without replacement by one generator seeded with ``seed``, the run of least inertia kept
    (the first on a tie); fewer distinct values than k: each is its own cluster. Returns ``(levels, centres)`` with
    the clusters renumbered by ascending centre: level 0 has the lowest centre (never the unsorted labels of the
    official code). An empty cluster keeps its centre."""
    x = x.to(torch.float64).flatten()
    values = torch.unique(x)
    if len(values) <= k:
        return _lloyd(x, values, iters)
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(restarts):
        levels, centres = _lloyd(x, values[torch.randperm(len(values), generator=gen)[:k]].sort().values, iters)
        inertia = float(((x - centres[levels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = inertia, levels, centres
    return best[1], best[2]


def _lloyd(x: Tensor, centres: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Lloyd's iterations from ``centres``; ``(levels, centres)`` renumbered by ascending centre."""
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        labels = (x[:, None] - centres[None, :]).abs().argmin(1)
        moved = torch.stack([x[labels == j].mean() if bool((labels == j).any()) else centres[j] for j in range(len(centres))])
        if torch.equal(moved, centres):
            break
        centres = moved
    order = centres.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank[labels], centres[order]


def fim_probabilities(scores: Tensor, seed: int, clusters: int = 3) -> Tensor:
    """``p_l`` from the blocks' averaged Fisher scores: a seeded 1-D k-means into 3 clusters, levels sorted by centre
    get weights 1, 2, 3 (the highest scores the most), normalised to sum 1 (float64). With fewer distinct scores than
    clusters the levels are the distinct values' ranks."""
    levels, _ = kmeans_1d(scores, clusters, seed)
    p = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)[levels]
    return p / p.sum()


def _comm(d: int, k: int, r: int, U: int, trained: Sequence[bool] | bool | None = None) -> tuple[int, int]:
    """Up: both factors of a matrix in a block the client trained this round, nothing otherwise; down: the whole
    adapter (both factors) to every client."""
    return (r * (d + k) if trained is not False else 0), r * (d + k)


@register_rule("fedhello", comm=_comm)
def fedhello(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, trained: Sequence[bool] | bool | None = None) -> Aggregate:
    """FedIT over the clients that trained this matrix: weights renormalised over them (``trained[u]``; default:
    every client did)."""
    mask = torch.ones(len(As), dtype=torch.float64) if trained is None or trained is True else torch.as_tensor(trained, dtype=torch.float64)
    if mask.shape != (len(As),) or float((w * mask).sum()) <= 0:
        raise ValueError("no client with weight trained this block; a block nobody trained keeps its factors (pass trained= per client)")
    coef = w * mask / (w * mask).sum()
    return Aggregate(method="fedhello", B=combine(Bs, coef), A=combine(As, coef), p=coef, q=coef.clone())
