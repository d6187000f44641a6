"""SLoRA (Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models", arXiv 2308.06522;
METHODS.md, wave 3): a sparse stage, then a LoRA started from the SVD of what it learned.

Stage 1 (rounds 1..R1), per adapted d×k matrix: a fixed index set Ω of ``|Ω| = ⌈δdk⌉`` entries (flat, row-major,
uniform without replacement, sorted; :func:`sparse_indices`) and a trainable ``v ∈ R^{|Ω|}``, zero at start, so
``W = W0 + scatter_Ω(v)``. Server: ``v̄ = Σ w_u v_u`` — exact and linear, since ``scatter`` is linear:
``scatter_Ω(v̄) = Σ_u w_u scatter_Ω(v_u)`` (:func:`scatter`). Up and down ``⌈δdk⌉`` (no indices: every process
draws the same Ω from the run's seed and the module's name, :func:`support_seed`).

Switch (after round R1): ``ΔW = scatter_Ω(v̄)`` and its rank-r SVD ``U_rΣ_rV_rᵀ``; the LoRA starts from
``A = V_rᵀ``, ``B = U_rΣ_r/s`` with s the adapter's scale (α/r, or α/√r for rsLoRA — not the reference's
hard-coded 16/r), so ``s·BA = [ΔW]_r`` (Eckart–Young) and v is dropped: the model is ``W0 + [ΔW]_r``. Our choice:
the SVD is exact, ``torch.linalg.svd`` of the dense d×k ΔW in float64, once per matrix and run (the size of one base
weight; METHODS.md allows a randomised one — the exact one needs no seed and is reproducible everywhere). The kept
energy ``‖[ΔW]_r‖²/‖ΔW‖²`` is reported (a 1 %-random sparse matrix is far from low rank). With ``residual="fold"``
``ΔW − [ΔW]_r`` is also folded into the base (dense dk down, once), so the model keeps all of ΔW.

Stage 2: FedIT (``B̂ = Σ w_u B_u``, ``Â = Σ w_u A_u``).

``comm`` per stage (``stage``): ``sparse`` ⌈δdk⌉ each way; ``switch`` ⌈δdk⌉ up, ``r(d+k)`` down (+ dk with the
residual fold); ``lora`` r(d+k) each way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import combine
from .fedit import fedit
from .registry import register_rule
from .result import Aggregate

__all__ = ["STAGES", "check_density", "slora", "sparse_indices", "sparse_size", "scatter", "support_seed", "switch_init"]

STAGES = ("sparse", "switch", "lora")
RESIDUALS = ("drop", "fold")
DEFAULT_DENSITY = 0.01  # the abstract's "~1 % density" (the reference code uses 0.0012)


def check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"SLoRA density δ is {density!r}; pass a number in (0, 1] such as 0.01 (the share of each matrix's entries trained in stage 1)")
    return float(density)


def sparse_size(d: int, k: int, density: float) -> int:
    """``|Ω| = ⌈δdk⌉`` (at least 1)."""
    return max(1, math.ceil(density * d * k))


def support_seed(seed: int, module: str) -> int:
    """The generator seed of ``module``'s index set in the run whose seed is ``seed`` (a hash, the same in every
    process, for every client and round)."""
    digest = hashlib.blake2b(f"slora|{int(seed)}|{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sparse_indices(d: int, k: int, density: float, seed: int) -> Tensor:
    """Ω: ``⌈δdk⌉`` flat row-major indices into a d×k matrix, uniform without replacement, sorted (int64)."""
    n = sparse_size(d, k, check_density(density))
    perm = torch.randperm(d * k, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n].sort().values


def scatter(v: Tensor, index: Tensor, d: int, k: int) -> Tensor:
    """``scatter_Ω(v)``: the d×k matrix with ``v`` at the flat indices Ω and zeros elsewhere (differentiable in v)."""
    out = v.new_zeros(d * k)
    return out.index_put((index.to(v.device),), v).view(d, k)


def switch_init(delta: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, float, Tensor]:
    """``(B, A, kept energy, residual)`` for the LoRA start from ``delta`` = ΔW (d×k): ``A = V_rᵀ``, ``B = U_rΣ_r/s``,
    so ``s·BA = [ΔW]_r``; the kept energy ``Σ_{i≤r} σ_i² / Σ σ_i²`` (1 when ΔW = 0); the residual ``ΔW − [ΔW]_r``.
    Exact SVD in float64; results in ``delta``'s dtype."""
    if not scale > 0:
        raise ValueError(f"SLoRA's switch needs a positive adapter scale s, got {scale}; check --alpha")
    D = delta.to(torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    r_eff = min(r, S.numel())
    B = torch.zeros(D.shape[0], r, dtype=torch.float64, device=D.device)
    A = torch.zeros(r, D.shape[1], dtype=torch.float64, device=D.device)
    B[:, :r_eff] = U[:, :r_eff] * S[:r_eff] / scale
    A[:r_eff] = Vh[:r_eff]
    total = float(S.square().sum())
    kept = float(S[:r_eff].square().sum()) / total if total > 0 else 1.0
    residual = D - scale * B @ A
    return B.to(delta.dtype), A.to(delta.dtype), kept, residual.to(delta.dtype)


def _comm(d: int, k: int, r: int, U: int, *, stage: str = "lora", density: float = DEFAULT_DENSITY,
          residual: str = "drop") -> tuple[int, int]:
    """Stage 1: ``⌈δdk⌉`` each way; the switch round: ⌈δdk⌉ up, the LoRA start ``r(d+k)`` down (+ the dense
    residual ``dk`` with ``residual="fold"``); stage 2 (FedIT): ``r(d+k)`` each way."""
    n = sparse_size(d, k, density)
    if stage == "sparse":
        return n, n
    if stage == "switch":
        return n, r * (d + k) + (d * k if residual == "fold" else 0)
    return r * (d + k), r * (d + k)


@register_rule("slora", comm=_comm)
def slora(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, stage: str = "lora", density: float = DEFAULT_DENSITY,
          residual: str = "drop", values: Sequence[Tensor] | None = None) -> Aggregate:
    """``stage="lora"``: FedIT on the factors. ``"sparse"``/``"switch"``: ``values[u]`` is client u's trained v_u;
    the result carries ``v̄ = Σ w_u v_u`` in ``info["values"]`` and the clients' frozen shared factors unchanged
    (the LoRA path did not train: its aggregation is exact). The switch itself is :func:`switch_init` (the server
    needs Ω and the adapter's scale, which the protocol holds)."""
    if stage not in STAGES:
        raise ValueError(f"SLoRA stage {stage!r} is not one of {', '.join(STAGES)}")
    if residual not in RESIDUALS:
        raise ValueError(f"SLoRA residual {residual!r} is not one of {', '.join(RESIDUALS)}; pass drop or fold")
    check_density(density)
    if stage == "lora":
        return fedit(Bs, As, w)
    if values is None or len(values) != len(As):
        got = "none" if values is None else len(values)
        raise ValueError(f"SLoRA's sparse stage needs one trained vector v_u per client; got {got} for {len(As)} clients (option values=[…])")
    if len({tuple(v.shape) for v in values}) != 1:
        raise ValueError("SLoRA: the clients' sparse vectors have different lengths; every client trains the same index set Ω")
    v_bar = combine(values, w, torch.float64).to(values[0].dtype)
    B, A = Bs[0], As[0]
    return Aggregate(method="slora", B=B.clone(), A=A.clone(), p=w.clone(), q=w.clone(), frozen_A=True, frozen_B=True,
                     info={"values": v_bar, "stage": stage})
