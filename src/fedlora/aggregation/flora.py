"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024).

Stacking: ``B̂ = [B_1 … B_U]`` (d×Σr_u), ``Â = [w_1A_1; …; w_UA_U]`` (Σr_u×k), so ``B̂Â = Σ w_u B_u A_u = ΔW*``
exactly. Clients merge ``B̂Â`` into their frozen W0 and re-initialise their LoRA each round. Ranks may differ
between clients (the paper's heterogeneous-rank setting). O(U·r(d+k)); broadcasts U times FedIT's bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .result import Aggregate


def flora(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    B_hat = torch.cat(Bs, dim=1)
    A_hat = torch.cat(As, dim=0)
    start = 0
    for A, c in zip(As, w.tolist()):  # scale each client's rows in place: one copy of the uploads, not two
        A_hat[start : start + A.shape[0]].mul_(c)
        start += A.shape[0]
    return Aggregate(method="flora", B=B_hat, A=A_hat)
