"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Stacking: ``B̂ = [B_1 … B_U]`` (d×Σr_u), ``Â = [w_1A_1; …; w_UA_U]`` (Σr_u×k), so ``B̂Â = Σ w_u B_u A_u = ΔW*``
exactly. Clients merge ``B̂Â`` into their frozen W0 and re-initialise their LoRA each round. Ranks may differ
between clients (the paper's heterogeneous-rank setting); with client scales s_u the stack is of ``√s_u B_u`` and
``w_u √s_u A_u``, so the fold is ``Σ w_u s_u B_u A_u`` whatever α/r each client uses. O(U·r(d+k)), no per-client loop; broadcasts
U times FedIT's bytes (Σ_u r_u(d+k) with mixed ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import batched
from ._common import weights_per_column
from .registry import register_rule
from .result import Aggregate
from .sketch import compute_dtype


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * (d + k), U * r * (d + k)  # every client receives every client's factors


@register_rule("flora", comm=_comm, mixed_ranks=True, truncates=False)
def flora(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    B_hat = torch.cat(Bs, dim=1)
    A_hat = torch.cat(As, dim=0)
    # Each client's rows scaled in place (one copy of the uploads, not two). Batched: one broadcast product; mixed
    # ranks need no padding, the weights are repeated over each client's own r_u rows.
    if batched(A_hat.device):
        A_hat.mul_(weights_per_column(w, [A.shape[0] for A in As]).to(A_hat.device, compute_dtype(A_hat.dtype))[:, None])
    else:
        start = 0
        for A, c in zip(As, w.tolist()):
            A_hat[start : start + A.shape[0]].mul_(c)
            start += A.shape[0]
    return Aggregate(method="flora", B=B_hat, A=A_hat)
