"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024): clients of different ranks, each sent its own truncation of the ideal update's SVD.

Server: ``ΔW* = Σ w_u s_u B_u A_u`` (scales inside, so clients with different α/r combine correctly); its SVD
``U Σ Vᵀ``; client u receives the rank-r_u truncation split evenly, ``B = U_{r_u} Σ_{r_u}^{1/2} / √s_u``,
``A = Σ_{r_u}^{1/2} V_{r_u}ᵀ / √s_u``, so that ``s_u B A = [ΔW*]_{r_u}`` (Eckart–Young at r_u). W0 never changes.
``.B``/``.A`` are ``[ΔW*]_{r_max}`` (the global model, scored); ``.clients`` each client's truncation. With equal
ranks and scales this is ``svd``.

Unlike the reference implementation (which forms the dense d×k update and runs a full SVD per layer per round,
and never instantiates per-client ranks), the SVD is the factor-space one of ``svd.py``: a Gram root of the
stacked A, the (Σr_u)² core's eigendecomposition, two thin products. O((d+k)(Σr_u)² + (Σr_u)³), never d×k. Above
``svd.EXACT_MAX_COLUMNS`` stacked columns (``solver="auto"``) the randomized path of ``svd.py`` takes over, linear
in the number of clients, ρ within ``tol`` of each truncation's bound.
"""

from __future__ import annotations

from torch import Tensor

from .registry import register_rule
from .result import Aggregate
from .svd import truncated_svd


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * (d + k), r * (d + k)  # r_u(d+k) each way: the client's own rank


@register_rule("flexlora", comm=_comm, mixed_ranks=True)
def flexlora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, solver: str = "auto", tol: float = 0.01, seed: int = 0) -> Aggregate:
    return truncated_svd(Bs, As, w, max(B.shape[1] for B in Bs), method="flexlora", solver=solver, tol=tol, seed=seed)
