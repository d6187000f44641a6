"""Fed-SB (LoRA-SB in federation; CERT-Lab/fed-sb): ``ΔW = s·B R A`` with B, A frozen, identical on every client,
and only the r×r core R trained. Since B and A are shared, ``Σ w_u B R_u A = B (Σ w_u R_u) A``: averaging the cores
is exact, and what travels is r² per matrix each way, independent of d and k. O(U·r²) plus one d×r·r×r product
to report ``B̂ = B R̄`` for the metrics.

``cores[u]`` is client u's core of *this* round (r×r, or h×r×r for block-diagonal cores: RAVAN's heads, see
:mod:`fedlora.aggregation.ravan`). The public multi-round script averages the cores of all past rounds; this rule
has no memory, so it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._common import block_diagonal, combine, shared_factor
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * r, r * r  # only the core: B and A are frozen and shared


def average_cores(Bs: Sequence[Tensor], As: Sequence[Tensor], w: Tensor, cores: Sequence[Tensor], method: str,
                  name: str | None) -> Aggregate:
    """``C̄ = Σ w_u C_u`` over the shared frozen bases; ``B̂ = B·blockdiag(C̄)``, ``Â = A`` (Fed-SB, RAVAN).

    Without ``cores``, ``Bs`` are the clients' left factors as the metrics see them, ``B_u = B·blockdiag(C_u)``,
    over the shared A: averaging them is the same exact identity (``B_u`` is linear in ``C_u``)."""
    if isinstance(cores, Sequence) and len(cores) == 0:
        A = shared_factor(As, "A", name, f"{method} needs the frozen shared A on every client; pass each client's cores= "
                                         "with the shared bases, or its factors B·C_u over the one shared A")
        return Aggregate(method=method, B=combine(Bs, w), A=A.clone(), p=w.clone(), frozen_A=True)
    if not isinstance(cores, Sequence) or len(cores) != len(As):
        got = len(cores) if isinstance(cores, Sequence) else type(cores).__name__
        raise ValueError(f"{method} got {got} cores for {len(As)} clients; pass one trained core per client (option cores=[…])")
    shapes = {tuple(c.shape) for c in cores}
    if len(shapes) != 1:
        raise ValueError(f"{method}: the clients' cores have different shapes {sorted(shapes)}; every client trains the same r×r core(s)")
    fix = f"{method} needs the frozen shared bases on every client (the same seeded B and A); build every client from one seed"
    B, A = shared_factor(Bs, "B", name, fix), shared_factor(As, "A", name, fix)
    inner = cores[0].shape[-1] * (cores[0].shape[0] if cores[0].dim() == 3 else 1)
    if B.shape[1] != inner or A.shape[0] != inner:
        raise ValueError(f"{method}: cores of shape {tuple(cores[0].shape)} do not fit bases B {tuple(B.shape)} and A {tuple(A.shape)}; "
                         "the core's size must equal the bases' inner dimension")
    core = combine(cores, w, B.dtype)
    return Aggregate(method=method, B=B @ block_diagonal(core), A=A.clone(), p=w.clone(), frozen_A=True, frozen_B=True, core=core)


@register_rule("fedsb", comm=_comm)
def fedsb(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, cores: Sequence[Tensor] = (), name: str | None = None) -> Aggregate:
    """``Bs``/``As``: each client's frozen shared B (d×r) and A (r×k); ``cores``: each client's trained R_u."""
    return average_cores(Bs, As, w, cores, "fedsb", name)
