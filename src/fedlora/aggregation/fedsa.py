"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

Only A is shared: ``Â = Σ w_u A_u``; each client keeps its own B (and, by default, its head) across rounds, so
the result is personalised and broadcasts no B. ``eval_B = Σ w_u B_u`` is kept only to score a global model
(the evaluation protocol's choice), never sent. O(U·rk), plus O(U·dr) for ``eval_B`` when Bs are given.
Mixed ranks: A (and ``eval_B``) by segment averaging.
"""

from __future__ import annotations

from torch import Tensor

from ._common import segment_combine
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * k, r * k  # only A travels; B stays on the client


@register_rule("fedsa", comm=_comm, needs_B=False, mixed_ranks=True)
def fedsa(Bs: list[Tensor] | None, As: list[Tensor], w: Tensor) -> Aggregate:
    eval_B = None if Bs is None else segment_combine(Bs, w, 1)
    q = w.clone() if len({A.shape[0] for A in As}) == 1 else None
    return Aggregate(method="fedsa", B=None, A=segment_combine(As, w, 0), p=None, q=q, eval_B=eval_B, personalised=True)
