"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

The server averages each factor separately: ``B̂ = Σ w_u B_u``, ``Â = Σ w_u A_u``. Cheap and simple, but
``B̂Â ≠ Σ w_u B_u A_u = ΔW*``: the cross terms ``w_u w_v B_u A_v`` leak in. O(U·r(d+k)).
"""

from __future__ import annotations

from torch import Tensor

from ._common import combine
from .result import Aggregate


def fedit(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    return Aggregate(method="fedit", B=combine(Bs, w), A=combine(As, w), p=w.clone(), q=w.clone())
