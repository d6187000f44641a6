"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

The server averages each factor separately: ``B̂ = Σ w_u B_u``, ``Â = Σ w_u A_u``. Cheap and simple, but
``B̂Â ≠ Σ w_u B_u A_u = ΔW*``: the cross terms ``w_u w_v B_u A_v`` leak in. O(U·r(d+k)).

Mixed ranks: segment averaging (component j averaged over the clients whose rank exceeds j, weights
renormalised over them); the result is then not a coefficient combination, so ``p`` and ``q`` are ``None``.
"""

from __future__ import annotations

from torch import Tensor

from ._common import segment_combine
from .registry import register_rule
from .result import Aggregate


def factors_comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    """Both factors up, both down: r(d+k) each way."""
    return r * (d + k), r * (d + k)


@register_rule("fedit", comm=factors_comm, mixed_ranks=True)
def fedit(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    same = len({A.shape[0] for A in As}) == 1
    coef = w.clone() if same else None
    return Aggregate(method="fedit", B=segment_combine(Bs, w, 1), A=segment_combine(As, w, 0), p=coef, q=coef)
