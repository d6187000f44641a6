"""RAVAN (Raje et al., NeurIPS 2025): ``ΔW = Σ_i s_i B_i H_i A_i`` over h heads, the bases ``B_i``, ``A_i`` frozen and
seeded (the same on every client), the r×r ``H_i`` and the scalars ``s_i`` trained. Stacking the bases,
``ΔW = B·blockdiag(s_1H_1, …, s_hH_h)·A``, so ``Σ_u w_u ΔW_u = B·blockdiag(Σ_u w_u s_{i,u} H_{i,u})·A``: the server
averages the products ``s_i H_i`` per head (not H and s apart, which is not the average of the updates) and
the result is exact. Clients upload h(r²+1) numbers per matrix and receive h·r²: the averaged ``s_iH_i`` become
the next ``H_i`` and every ``s_i`` restarts at 1. O(U·h·r²).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .fedsb import average_cores
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int, heads: int = 4) -> tuple[int, int]:
    return heads * (r * r + 1), heads * r * r


@register_rule("ravan", comm=_comm)
def ravan(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, cores: Sequence[Tensor] = (), gains: Sequence[Tensor] = (),
          heads: int = 4, name: str | None = None) -> Aggregate:
    """``Bs``/``As``: each client's stacked frozen bases (d×hr, hr×k); ``cores[u]``: client u's ``H_i`` as one
    heads×r×r tensor; ``gains[u]``: its ``heads`` scalars ``s_i`` (all 1 when not given). ``.core`` is
    ``Σ_u w_u s_{i,u} H_{i,u}`` per head."""
    if gains and len(gains) != len(cores):
        raise ValueError(f"ravan got {len(gains)} gain vectors for {len(cores)} clients' cores; pass one per client, or none")
    if any(H.dim() != 3 or H.shape[0] != heads for H in cores):
        raise ValueError(f"ravan's cores are heads×r×r stacks with heads={heads}; pass each client's H_1…H_h as one tensor, "
                         "and heads= the number of heads")
    if any(g.shape != (heads,) for g in gains):
        raise ValueError(f"ravan's gains are vectors of length heads={heads}, one s_i per head")
    scaled = [H * g.to(H.dtype)[:, None, None] for H, g in zip(cores, gains)] if gains else list(cores)
    return average_cores(Bs, As, w, scaled, "ravan", name)
