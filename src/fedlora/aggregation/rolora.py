"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025).

Rounds alternate: in a B-round every client trains only B from the global factors (A frozen, the same on every
client), in an A-round only A (B frozen). The server averages the factor trained that round and keeps the other:

    B-round:  B̂ = Σ w_u B_u,  Â = A      (Σ w_u B_u A = (Σ w_u B_u) A)
    A-round:  B̂ = B,          Â = Σ w_u A_u   (Σ w_u B A_u = B (Σ w_u A_u))

so every round is exact, and only the trained factor travels (``dr`` up and down in B-rounds, ``rk`` in A-rounds).
Which round it is is the option ``trained`` (``"B"`` or ``"A"``); the protocol makes round 1 a B-round, because
B starts at zero and an A-round from B = 0 learns nothing (FedLLM-Factory's RoLoRA wastes its first round so).
A frozen factor that differs between clients is refused: the identity above needs the one every client shares.
O(U·dr) or O(U·rk).
"""

from __future__ import annotations

from torch import Tensor

from ._common import combine, shared_factor
from .registry import register_rule
from .result import Aggregate

FACTORS = ("B", "A")


def _trained(trained: object) -> str:
    if trained not in FACTORS:
        raise ValueError(f"RoLoRA's trained factor is {trained!r}; pass trained='B' (a B-round) or trained='A' (an A-round)")
    return trained


def _comm(d: int, k: int, r: int, U: int, trained: str = "B") -> tuple[int, int]:
    n = d * r if _trained(trained) == "B" else r * k  # only the factor trained this round travels, each way
    return n, n


@register_rule("rolora", comm=_comm)
def rolora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, trained: str = "B", name: str | None = None) -> Aggregate:
    fix = "RoLoRA freezes it at the global factor every client started the round from; send each client the same one"
    if _trained(trained) == "B":
        A = shared_factor(As, "A", name, fix)
        return Aggregate(method="rolora", B=combine(Bs, w), A=A.clone(), p=w.clone(), frozen_A=True)
    B = shared_factor(Bs, "B", name, fix)
    return Aggregate(method="rolora", B=B.clone(), A=combine(As, w), q=w.clone(), frozen_B=True)
