"""Fed-HeLLo (Zhang et al., TNNLS 2025, arXiv 2506.12213; METHODS.md, wave 3): each client trains the LoRA of only
the transformer blocks allocated to it this round; the server averages each block over the clients that trained it.

Server, one adapted matrix of block l with trainers ``S_l ≠ ∅``: ``B = Σ_{S_l} w_u B_u / Σ_{S_l} w_u``, A likewise
(the official ``weighted_average_lora_depthfl``); a block nobody trained keeps its factors (the protocol does not
call the rule for it). With every client training every block it is FedIT. O(U·r(d+k)).

Allocation (RGD-HLA): each round and client, ``L_u`` distinct blocks drawn without replacement with probabilities
``p_l`` from a generator seeded by (run seed, round, client). Patterns: ``bottleneck`` — the official 12-block
``layer_prob`` [3,3,3,2,2,1,1,1,2,3,3,3]/27 resampled to L blocks by nearest index (our choice: block l takes entry
``round(l·11/(L−1))``); ``uniform``; ``triangle`` ``p_l ∝ l+1``; ``inverted`` ``p_l ∝ L−l`` (our reading of the
paper's names). The FIM-based allocation (FIM-HLA) is not implemented.

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

__all__ = ["PATTERNS", "allocate", "block_of", "fedhello", "layer_probabilities"]

PATTERNS = ("bottleneck", "uniform", "triangle", "inverted")
BOTTLENECK = (3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3)  # the official 12-block layer_prob, over 27


def block_of(module: str) -> int | None:
    """The transformer block of an adapted module: its first dotted name component that is an integer (None: in no
    numbered block)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_probabilities(L: int, pattern: str) -> Tensor:
    """``p_l`` over L blocks (float64, sums to 1)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown Fed-HeLLo pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
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
    digest = hashlib.blake2b(f"fedhello|{int(seed)}|{int(rnd)}|{int(cid)}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    picked = torch.multinomial(probs.to(torch.float64), budget, replacement=False, generator=gen)
    return sorted(blocks[i] for i in picked.tolist())


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
