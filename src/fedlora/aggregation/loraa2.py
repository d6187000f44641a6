"""LoRA-A² (Koo, Jang, Ok, "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients", ACL 2025, arXiv 2410.22815): alternating freeze with adaptive rank selection under an upload budget.

Rounds alternate as in RoLoRA (odd rounds train B with A frozen and shared, even rounds A). Client u keeps only
the ``b_u·N`` (module, rank) pairs of largest score (eq. 4)

    B-rounds:  S_{m,i} = ‖ΔB_m[:, i] A_m[i, :]‖_F = ‖ΔB_m[:, i]‖·‖A_m[i, :]‖
    A-rounds:  S_{m,i} = ‖B_m[:, i]‖·‖ΔA_m[i, :]‖

over all N adapted modules (so a module may keep 0 or all r of its components), trains with the others masked
and uploads the selected columns of ΔB (rows of ΔA) with an N·r-bit mask. The server (Alg. 1):

    B^{t+1} = B^t + Σ_u w_u (ΔB_u ⊙ M_u)          (unselected entries count as zero, as the paper)

or, with ``average="selected"`` (our option, off by default), per rank component i over its selectors only:
``B^{t+1}[:, i] = B^t[:, i] + Σ_u w_u M_{u,i} ΔB_u[:, i] / Σ_u w_u M_{u,i}``. With A shared and frozen the round is
exact: ``B^{t+1}A − B^tA = Σ_u w_u (B_u − B^t) A``. O(U·dr) or O(U·rk).

This module holds the math the client and the server share: the scores, the selection, the mask's bit packing,
the rule and its bytes (the selected columns; the mask's bits are side bytes the protocol counts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch import batched, stacked_segment_sum
from ._common import shared_factor
from .registry import register_rule
from .result import Aggregate

FACTORS = ("B", "A")
AVERAGES = ("all", "selected")


def default_budget(r: int) -> int:
    """Our default upload budget: ⌈r/4⌉ ranks per module on average (the paper's analysis uses 2 of 16)."""
    return math.ceil(r / 4)


def _trained(trained: object) -> str:
    if trained not in FACTORS:
        raise ValueError(f"LoRA-A²'s trained factor is {trained!r}; pass trained='B' (a B-round) or trained='A' (an A-round)")
    return trained


def rank_scores(delta: Tensor, other: Tensor, trained: str) -> Tensor:
    """S_i = ‖ΔB[:, i]‖·‖A[i, :]‖ (``trained="B"``: ``delta`` = ΔB d×r, ``other`` = A r×k) or ‖B[:, i]‖·‖ΔA[i, :]‖
    (``trained="A"``: ``delta`` = ΔA, ``other`` = B), in float64: the norm of rank component i's update ΔB_i A_i."""
    delta, other = delta.detach().to(torch.float64), other.detach().to(torch.float64)
    if _trained(trained) == "B":
        return delta.norm(dim=0) * other.norm(dim=1)
    return other.norm(dim=0) * delta.norm(dim=1)


def select_top(scores: list[Tensor], count: int) -> list[Tensor]:
    """Boolean masks (one per module, length r) keeping the ``count`` (module, rank) pairs of largest score over all
    modules together. Ties go to the earlier module, then the lower rank (a stable sort: deterministic)."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    if not 0 <= count <= flat.numel():
        raise ValueError(f"LoRA-A² keeps {count} (module, rank) pairs of {flat.numel()}; pass a budget from 1 to the rank")
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return list(keep.split([s.numel() for s in scores]))


def pack_mask(masks: Tensor) -> Tensor:
    """An N×r boolean mask as ⌈N·r/8⌉ bytes (uint8, row-major, least significant bit first): the N·r bits sent."""
    bits = masks.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, n: int, r: int) -> Tensor:
    """The N×r boolean mask ``pack_mask`` sent; a wrong dtype, size or a set padding bit fails in one line."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or tuple(packed.shape) != (math.ceil(n * r / 8),):
        got = (packed.dtype, tuple(packed.shape)) if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"LoRA-A²'s mask must be {math.ceil(n * r / 8)} bytes (uint8) for {n} modules × rank {r}; got {got}")
    bits = (packed.cpu()[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = bits.reshape(-1)
    if bits[n * r:].any():
        raise ValueError("LoRA-A²'s mask sets bits beyond its N·r entries; send pack_mask of the N×r selection")
    return bits[: n * r].to(torch.bool).reshape(n, r)


def _comm(d: int, k: int, r: int, U: int, trained: str = "B", budget: int | None = None) -> tuple[int, int]:
    b = default_budget(r) if budget is None else budget
    # up: b_u selected columns of ΔB (d each) or rows of ΔA (k each) per module on average (the mask's N·r bits are
    # side bytes, Method.side_bytes); down: the whole trained factor
    if _trained(trained) == "B":
        return b * d, d * r
    return b * k, r * k


@register_rule("loraa2", comm=_comm)
def loraa2(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, trained: str = "B", masks: list[Tensor] | None = None,
           average: str = "all", start: Tensor | None = None, budget: int | None = None, name: str | None = None) -> Aggregate:
    """The server rule on the clients' factors (the frozen one shared): ``masks[u]`` (length r, bool) is client u's
    selection of this module (None: every component); ``start`` the trained factor's B^t (A^t), which every client
    started from. Without masks it may be left out: the uploads' weighted mean (Σ w = 1) is then the same.
    ``budget`` (b_u, ranks per module on average) only sizes the upload (``comm``): the masks carry the selection."""
    if average not in AVERAGES:
        raise ValueError(f"LoRA-A²'s average is {average!r}; pass one of {', '.join(AVERAGES)}")
    fix = "LoRA-A² freezes it at the global factor every client started the round from; send each client the same one"
    is_B = _trained(trained) == "B"
    ups, frozen = (Bs, As) if is_B else (As, Bs)
    shared = shared_factor(frozen, "A" if is_B else "B", name, fix)
    if start is None and masks is not None:
        raise ValueError("LoRA-A²'s masked rule needs the round's start factor (B^t or A^t); pass start=")
    dim = 1 if is_B else 0  # the rank dimension of the trained factor
    r = ups[0].shape[dim]
    ms = masks if masks is not None else [torch.ones(r, dtype=torch.bool)] * len(ups)
    coef = torch.stack([float(wu) * m.cpu().to(torch.float64) for wu, m in zip(w, ms)])  # U×r: w_u M_{u,i}
    if average == "selected":  # renormalised per rank component over the clients that selected it
        total = coef.sum(dim=0)
        coef = coef / torch.where(total > 0, total, torch.ones_like(total))
    base = torch.zeros_like(ups[0], dtype=torch.float64) if start is None else start.to(torch.float64)
    if batched(ups[0].device):  # one einsum over the stacked deviations from the start
        out = base + stacked_segment_sum(torch.stack(list(ups)).to(torch.float64) - base, coef, dim)
    else:
        out = base.clone()
        for u, t in enumerate(ups):
            c = coef[u].to(t.device)
            out += (t.to(torch.float64) - base) * (c[None, :] if is_B else c[:, None])
    new = out.to(ups[0].dtype)
    if is_B:
        return Aggregate(method="loraa2", B=new, A=shared.clone(), frozen_A=True, info={"average": average})
    return Aggregate(method="loraa2", B=shared.clone(), A=new, frozen_B=True, info={"average": average})
