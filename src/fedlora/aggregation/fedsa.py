"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

Only A is shared: ``Â = Σ w_u A_u``; each client keeps its own B (and, by default, its head) across rounds, so
the result is personalised and broadcasts no B. ``eval_B = Σ w_u B_u`` is kept only to score a global model
(the evaluation protocol's choice), never sent. O(U·rk), plus O(U·dr) for ``eval_B`` when Bs are given.
"""

from __future__ import annotations

from torch import Tensor

from ._common import combine
from .result import Aggregate


def fedsa(Bs: list[Tensor] | None, As: list[Tensor], w: Tensor) -> Aggregate:
    eval_B = None if Bs is None else combine(Bs, w)
    return Aggregate(method="fedsa", B=None, A=combine(As, w), p=None, q=w.clone(), eval_B=eval_B, personalised=True)
