"""FRLoRA (Yan et al., "Federated Residual Low-Rank Adaptation of Large Language Models", ICLR 2025).

Each round the server folds FedIT's update into the frozen base of the global model and of every client, and
clients re-initialise their LoRA: the global weight accumulates one residual low-rank update per round instead of
carrying one rank-r adapter, so after T rounds its update has rank up to T·r.

Server: ``B̄ = Σ w_u B_u``, ``Ā = Σ w_u A_u`` (FedIT's means); the fold is ``B̄Ā`` as the factors ``(B̄, Ā)``
(``base_delta_factors``), rank ≤ r. Why ``B̄Ā`` and not the update relative to the start, ``B̄Ā − B_0A_0``: the
round moves the effective weight ``W0 + s B_0A_0`` (what every client started from) by ``s(B̄Ā − B_0A_0)``, and
the re-initialisation (B = 0) also removes the start's own ``s B_0A_0`` from the LoRA, so the base must receive
both: ``(B̄Ā − B_0A_0) + B_0A_0 = B̄Ā``. With PEFT's initialisation ``B_0 = 0`` in every round (round 1's init
and every re-init), so this is exactly the paper's ``B̄Ā − B_0A_0`` and needs no ``B_0`` on the wire.

The result's ``B`` (d×r) and ``A`` (r×k) are zero: the LoRA product every client restarts from (B = 0 after the
re-init; the fresh A is drawn on the client from the round's seed, so neither factor is sent). ``delta()`` is
thus FedIT's ``B̄Ā`` (FRLoRA folds FedIT's aggregation error too: not exact). What goes down is the fold only,
the cheaper of dense d·k and factored r(d+k) (``down_elements``). Linear in the uploads: the server needs only
``Σ w_u B_u`` and ``Σ w_u A_u``. O(U·r(d+k)); never forms a d×k matrix.
"""

from __future__ import annotations

from torch import Tensor

from ._common import combine
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    """Both factors up; down only the fold B̄Ā (rank ≤ r), dense or factored, whichever is smaller."""
    return r * (d + k), min(d * k, r * (d + k))


class FoldOnly(Aggregate):
    """An aggregate whose factors are not sent (clients re-initialise them): only the base fold goes down."""

    def down_elements(self) -> int:
        return self.residual_elements()


@register_rule("frlora", comm=_comm)
def frlora(Bs: list[Tensor], As: list[Tensor], w: Tensor) -> Aggregate:
    B_bar, A_bar = combine(Bs, w), combine(As, w)
    return FoldOnly(method="frlora", B=B_bar.new_zeros(B_bar.shape), A=A_bar.new_zeros(A_bar.shape),
                    base_delta_factors=(B_bar, A_bar), info={"weights": w.clone()})
