"""FSLoRA (Fang et al., "Federated Sketching LoRA", arXiv 2501.19389; METHODS.md, wave 3).

The server holds one global ``(B, A)`` at rank r. Client u trains a *sketch* of it: an index set ``J_u`` of
``k_u ≤ r`` rank components, drawn uniformly without replacement, as a rank-k_u LoRA ``(B[:, J], A[J, :])`` at the
scale ``s·r/k_u``: the sketching matrix ``S = (r/k) Σ_{j∈J} e_j e_jᵀ`` has ``E[S] = I``, so the sketched product
``(r/k) B_J A_J`` is an unbiased estimate of ``BA`` (:func:`sketch_mean` checks it over all index sets).

Server rule, one adapted matrix: the pseudo-gradient ``g = Σ_u w_u P_u(x_t[J_u] − x_u)``, ``P_u`` scattering the
client's k_u components back into rank r with zeros elsewhere — no renormalisation: the zeros are part of the
unbiased estimator — and ``x_{t+1} = x_t − g`` (a server step of η = 1; the server optimisers of METHODS.md read
``g = x_t − x_{t+1}`` back from this result). Per component j this is ``(1 − c_j) x_t[j] + Σ_{u: j∈J_u} w_u x_u[j]``
with ``c_j = Σ_{u: j∈J_u} w_u`` the weight that trained it. With every ``J_u`` the full set (all k_u = r) it is
FedIT's ``Σ w_u x_u``. O(U·r(d+k)); never d×k.

Our choices (METHODS.md): the sketch is drawn from a generator seeded by (run seed, round, client, module), the same
on the server and the client, so no indices travel (the paper's server generates the sketches); one J serves a
module's B columns and A rows (the official code draws a fresh ``randperm`` for every parameter, so B's columns and
A's rows would not correspond, and its name match ``'lora_B' == n`` never fires, so it runs FedIT with a server
AdamW); an index set is sorted, so ``k_u = r`` delivers the global factors as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ._batch import batched
from .registry import register_rule
from .result import Aggregate

__all__ = ["fslora", "sketch_indices", "sketch_mean", "sketch_seed"]


def sketch_seed(seed: int, cid: int, module: str) -> int:
    """The generator seed of client ``cid``'s sketch of ``module`` in the round whose seed is ``seed`` (a hash, the
    same in every process)."""
    digest = hashlib.blake2b(f"fslora|{int(seed)}|{int(cid)}|{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sketch_indices(r: int, k: int, seed: int) -> Tensor:
    """``k`` of the ``r`` rank components, uniformly without replacement from a generator seeded by ``seed``, sorted."""
    if not 1 <= k <= r:
        raise ValueError(f"sketch size {k} is outside 1..{r} (the global rank); pass --client-ranks sizes from 1 to --rank")
    perm = torch.randperm(r, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:k].sort().values


def sketch_mean(B: Tensor, A: Tensor, index_sets: Sequence[Tensor]) -> Tensor:
    """The mean of the sketched products ``(r/k) B[:, J] A[J]`` over ``index_sets`` (d×k dense: tests only)."""
    r = A.shape[0]
    return sum((r / len(J)) * B[:, J] @ A[J] for J in index_sets) / len(index_sets)


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return r * (d + k), r * (d + k)  # r: the client's sketch size k_u; its two factors each way


def _scatter(xs: Sequence[Tensor], sets: Sequence[Tensor], w: Tensor, dim: int, r: int) -> tuple[Tensor, Tensor]:
    """``Σ_u w_u P_u x_u`` (float64) and the coverage ``c_j = Σ_{u: j∈J_u} w_u`` (length r)."""
    shape = list(xs[0].shape)
    shape[dim] = r
    total = torch.zeros(shape, dtype=torch.float64, device=xs[0].device)
    cover = torch.zeros(r, dtype=torch.float64, device=xs[0].device)
    if batched(xs[0].device):  # one index_add over the concatenated sketches, weights repeated per component
        J = torch.cat(list(sets)).to(xs[0].device)
        coef = torch.repeat_interleave(w.to(torch.float64), torch.tensor([len(s) for s in sets])).to(xs[0].device)
        view = [1] * xs[0].dim()
        view[dim] = -1
        total.index_add_(dim, J, torch.cat(list(xs), dim).to(torch.float64) * coef.view(view))
        cover.index_add_(0, J, coef)
        return total, cover
    for x, J, wu in zip(xs, sets, w.tolist()):
        J = J.to(x.device)
        total.index_add_(dim, J, x.to(torch.float64), alpha=wu)
        cover.index_add_(0, J, torch.full((len(J),), wu, dtype=torch.float64, device=x.device))
    return total, cover


@register_rule("fslora", comm=_comm, mixed_ranks=True, truncates=False)
def fslora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, index_sets: Sequence[Tensor] | None = None,
           start: tuple[Tensor, Tensor] | None = None) -> Aggregate:
    """``x_{t+1} = x_t − Σ_u w_u P_u(x_t[J_u] − x_u)`` for both factors.

    ``index_sets[u]``: client u's sketch ``J_u`` (sorted, ``len = k_u``); default every client's first k_u
    components. ``start``: the global ``(B_t, A_t)`` at rank r the sketches were cut from; it may be left out only
    when every component was trained with total weight 1 (every J_u the full set: FedIT)."""
    sets = [torch.arange(A.shape[0]) for A in As] if index_sets is None else [torch.as_tensor(J, dtype=torch.long) for J in index_sets]
    if len(sets) != len(As) or any(len(J) != A.shape[0] for J, A in zip(sets, As)):
        raise ValueError("index_sets must hold one index set per client, of its sketch size k_u; pass the sets the clients trained")
    r = start[1].shape[0] if start is not None else max(int(J.max()) + 1 for J in sets)
    if any(int(J.min()) < 0 or int(J.max()) >= r for J in sets):
        raise ValueError(f"an index set reaches outside the global rank {r}; pass index sets drawn from range(r)")
    B_sum, cover = _scatter(Bs, sets, w, 1, r)
    A_sum, _ = _scatter(As, sets, w, 0, r)
    if start is None:
        if not torch.allclose(cover, torch.ones_like(cover)):
            raise ValueError("FSLoRA needs the global factors where a component was not trained by every client; pass start=(B_t, A_t)")
        B_new, A_new = B_sum, A_sum
    else:
        keep = 1.0 - cover
        B_new = start[0].to(torch.float64) * keep[None, :] + B_sum
        A_new = start[1].to(torch.float64) * keep[:, None] + A_sum
    return Aggregate(method="fslora", B=B_new.to(As[0].dtype), A=A_new.to(As[0].dtype), info={"coverage": cover})
