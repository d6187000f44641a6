"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Every client freezes A at the same seeded init ``A0`` and trains only B, so ``Σ w_u B_u A0 = (Σ w_u B_u) A0``
and averaging B is exact: ``B̂ = Σ w_u B_u``, ``Â = A0``. O(U·dr).
"""

from __future__ import annotations

from torch import Tensor

from ._common import combine, shared_factor
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return d * r, d * r  # A is frozen at the shared seed: only B travels


@register_rule("ffa", comm=_comm)
def ffa(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, name: str | None = None) -> Aggregate:
    A0 = shared_factor(As, "A", name, "FFA-LoRA needs the frozen shared A0 on every client, so freeze A at one seeded init or choose another method")
    return Aggregate(method="ffa", B=combine(Bs, w), A=A0.clone(), p=w.clone(), q=None, frozen_A=True)
