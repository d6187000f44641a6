"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025).

Broadcast FedIT's ``B̂ = Σ w_u B_u``, ``Â = Σ w_u A_u`` and fold the residual ``ΔW* − B̂Â`` into every client's
frozen W0, which makes the round exact. The residual is kept factored, ``L R`` with
``L = [w_1B_1 … w_UB_U, −B̂]`` (d×(U+1)r) and ``R = [A_1; …; A_U; Â]``; it costs the cheaper of d·k dense or
(U+1)r(d+k) factored elements to send. O(U·r(d+k)) here, the scaling of L one batched product; O(dk·(U+1)r) where a client materialises it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import batched
from ._common import combine
from .registry import register_rule
from .result import Aggregate
from .sketch import compute_dtype


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    factors = r * (d + k)  # FedIT's factors plus the residual, dense or factored, whichever is smaller
    return factors, factors + min(d * k, (U + 1) * factors)


@register_rule("fedex", comm=_comm)
def fedex(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    B_hat, A_hat = combine(Bs, w), combine(As, w)
    L = torch.cat([*Bs, B_hat], dim=1)
    U, r = len(Bs), Bs[0].shape[1]
    # L = [w_1B_1 … w_UB_U, −B̂], scaled in place. Batched: one broadcast product over the d×U×r view of the stacked
    # part (coefficients in float32, float64 for float64 uploads: the precision ``mul_`` by a Python number uses).
    if batched(L.device):
        L[:, : U * r].view(L.shape[0], U, r).mul_(w.to(L.device, compute_dtype(L.dtype))[:, None])
    else:
        for u, c in enumerate(w.tolist()):
            L[:, u * r : (u + 1) * r].mul_(c)
    L[:, U * r :].neg_()
    R = torch.cat([*As, A_hat], dim=0)
    return Aggregate(method="fedex", B=B_hat, A=A_hat, base_delta_factors=(L, R), p=w.clone(), q=w.clone())
