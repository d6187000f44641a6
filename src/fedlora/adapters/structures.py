"""Adapter structures PEFT does not ship, built on its LoRA layers by a small module swap.

PEFT's LoRA forward is ``W0 x + s·lora_B(lora_A(x))``; these structures change what ``lora_A``/``lora_B`` hold or
add a term after it, so PEFT still targets the layers (``--target-modules``), saves the head and disables
adapters, and :class:`~fedlora.adapters.AdapterHandle` reads the result as ordinary factors ``(B_u, A_u)``.

- **core** (Fed-SB's LoRA-SB; RAVAN): ``ΔW = s·B·blockdiag(g_1H_1, …, g_hH_h)·A``. ``lora_A`` holds the frozen
  basis A (hr×k), ``lora_B`` becomes a :class:`CoreB` holding the frozen basis B (d×hr), the trainable r×r
  cores ``H_i`` (zero at start) and, for RAVAN, trainable per-head gains ``g_i`` (one at start). The bases are
  seeded, so every client and every process builds the same ones.
- **dual** (FedDPA): a second LoRA adapter ``local`` on the same layers, mixed per instance with the global one:
  ``y = W0x + s(1−α_x)·B_gA_g x + s·α_x·B_lA_l x`` (:class:`DualMix`). With α = 0 (the default state) the model
  is the global adapter alone.
- **sparse** (SLoRA's stage 1): a :class:`SparseDelta` beside the LoRA path, ``W = W0 + scatter_Ω(v) + s·BA``: a
  fixed seeded index set Ω (a buffer, the same in every process) and a trainable ``v`` (zero at start), added by a
  forward hook (:func:`install_sparse`). Once ``off`` (SLoRA's switch: v is zero from then on) the hook adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOCAL = "local"  # the name of FedDPA's second (private) adapter


class CoreB(nn.Module):
    """``lora_B`` of a core structure: ``z ↦ B·blockdiag(g_i H_i)·z`` with B frozen (``weight``, d×hr), the cores
    ``core`` (h×r×r) and the gains ``gain`` (h, or None: fixed at 1). Named ``weight`` so PEFT finds B's dtype."""

    def __init__(self, basis: Tensor, heads: int, gains: bool):
        super().__init__()
        hr = basis.shape[1]
        if hr % heads:
            raise ValueError(f"a basis of {hr} columns does not split into {heads} heads")
        r = hr // heads
        self.weight = nn.Parameter(basis)  # state every client holds; the method freezes it in every round
        self.core = nn.Parameter(basis.new_zeros(heads, r, r))
        self.gain = nn.Parameter(basis.new_ones(heads)) if gains else None

    def forward(self, z: Tensor) -> Tensor:
        h, r, _ = self.core.shape
        cores = self.core if self.gain is None else self.core * self.gain[:, None, None]
        y = torch.einsum("...hj,hij->...hi", z.unflatten(-1, (h, r)), cores.to(z.dtype)).flatten(-2)
        return F.linear(y, self.weight)


class SparseDelta(nn.Module):
    """``scatter_Ω(v)`` for one d×k matrix: ``values`` (trainable, |Ω|) at the flat row-major indices ``index``."""

    def __init__(self, index: Tensor, d: int, k: int, dtype: torch.dtype, device):
        super().__init__()
        self.d, self.k = d, k
        self.register_buffer("index", index.to(device), persistent=False)
        self.values = nn.Parameter(torch.zeros(len(index), dtype=dtype, device=device))
        self.off = False  # set once the values are dropped for good: the hook then skips the zero product

    def dense(self, values: Tensor | None = None) -> Tensor:
        """The d×k (out×in) matrix ``scatter_Ω(values)`` (the module's own values by default): the values at the flat
        row-major indices, zeros elsewhere; differentiable in the values."""
        v = self.values if values is None else values
        return v.new_zeros(self.d * self.k).index_put((self.index.to(v.device),), v).view(self.d, self.k)


def _sparse_hook(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
    sparse = layer.sparse_delta
    if sparse.off or layer.disable_adapters:
        return output
    x = args[0]
    return output + F.linear(x.to(sparse.values.dtype), sparse.dense()).to(output.dtype)


@torch.no_grad()
def install_sparse(model: nn.Module, indices: Callable[[str, int, int], Tensor]) -> None:
    """Give every LoRA layer of ``model`` a :class:`SparseDelta` (SLoRA's stage 1) with ``v`` zero and trainable:
    ``indices(name, d, k)`` is the layer's Ω (flat row-major indices into d×k; ``name`` without PEFT's
    ``base_model.model.`` prefix), which the method draws the same in every process."""
    for name, layer in lora_layers(model):
        d, k = layer.out_features, layer.in_features
        weight = layer.lora_A["default"].weight
        index = indices(name.removeprefix("base_model.model."), d, k)
        layer.sparse_delta = SparseDelta(index, d, k, weight.dtype, weight.device)
        layer.register_forward_hook(_sparse_hook)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """PEFT LoRA layers with a ``default`` adapter, in module order."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and "default" in module.lora_A:
            yield name, module


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # unique: positive diagonal of R


def basis_gain(d: int, heads: int, rank: int) -> float:
    """The scale γ of each orthonormal basis: ``γ² = √(d/(3hr))``. One Adam step moves every core entry by about
    lr, i.e. ΔW by ``s·γ²·lr·r√h``; on LoRA it moves B's entries by lr over PEFT's Kaiming-uniform A (rows of norm
    1/√3), i.e. ΔW by ``s·lr·√(dr/3)``. Equal with this γ, so one learning rate serves both in a comparison, and
    the update grows with the width as LoRA's does, not with √(dk) as unit Gaussian bases would make it."""
    return (d / (3 * heads * rank)) ** 0.25


@torch.no_grad()
def install_core(model: nn.Module, *, rank: int, heads: int = 1, gains: bool = False, seed: int = 0,
                 bases: Callable[[str, nn.Module], tuple[Tensor, Tensor]] | None = None, method: str = "fedsb") -> None:
    """Turn every LoRA layer of ``model`` into the core structure: frozen bases of inner size ``heads·rank``, cores
    ``heads×rank×rank`` (zero) and, with ``gains``, one trainable scalar per head (one).

    ``bases(name, layer)`` gives (B, A) for a layer (Fed-SB's gradient init); default: seeded orthonormal bases
    times :func:`basis_gain`, the seed mixed with the layer's position, the same in every process."""
    hr = heads * rank
    for i, (name, layer) in enumerate(lora_layers(model)):
        d, k = layer.out_features, layer.in_features
        if hr > min(d, k):
            raise ValueError(f"{method}: {heads} head(s) of rank {rank} need {hr} orthonormal directions but layer {name} is "
                             f"{d}×{k}; pass a smaller --rank (or fewer heads)")
        old = layer.lora_A["default"].weight
        if bases is None:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (i + 1))
            g = basis_gain(d, heads, rank)
            B, A = _orthonormal(d, hr, gen) * g, _orthonormal(k, hr, gen).T * g
        else:
            B, A = bases(name, layer)
        lin = nn.Linear(k, hr, bias=False, device=old.device, dtype=old.dtype)
        lin.weight.copy_(A.to(old.dtype))
        layer.lora_A["default"] = lin
        layer.lora_B["default"] = CoreB(B.to(device=old.device, dtype=old.dtype), heads, gains)


class DualMix:
    """FedDPA's per-instance mix of the global adapter (``default``) and the private one (``local``) on every LoRA
    layer: a forward hook adds ``s·α·(B_lA_l x − B_gA_g x)`` to PEFT's ``W0x + s·B_gA_g x``. ``alpha`` is 0 (off,
    the global model), a number (training), or a length-batch tensor (per-instance scoring)."""

    def __init__(self, model: nn.Module):
        self.alpha: float | Tensor = 0.0
        self.layers = [layer for _, layer in lora_layers(model) if LOCAL in layer.lora_A]
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        alpha = self.alpha
        if (isinstance(alpha, float) and alpha == 0.0) or layer.disable_adapters:
            return output
        x = args[0]
        x = x.to(layer.lora_A[LOCAL].weight.dtype)
        local = layer.lora_B[LOCAL](layer.lora_A[LOCAL](layer.lora_dropout[LOCAL](x))) * layer.scaling[LOCAL]
        glob = layer.lora_B["default"](layer.lora_A["default"](layer.lora_dropout["default"](x))) * layer.scaling["default"]
        if isinstance(alpha, Tensor):
            alpha = alpha.to(output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
        return output + alpha * (local - glob).to(output.dtype)

    @contextmanager
    def mixed(self, alpha: float | Tensor):
        before, self.alpha = self.alpha, alpha
        try:
            yield
        finally:
            self.alpha = before


def add_local_adapter(model: nn.Module, config) -> DualMix:
    """FedDPA: add the private ``local`` LoRA (``config``: the global adapter's PEFT config, without a head of its
    own), make its factors trainable, and return the mix that combines the two."""
    model.add_adapter(LOCAL, config)
    for name, p in model.named_parameters():
        if f".{LOCAL}." in name and ".lora_" in name:
            p.requires_grad_(True)
    # PEFT also copies the task head for the new adapter; FedDPA's head is the global one, so drop the copy.
    for module in model.modules():
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and LOCAL in saved:
            del saved[LOCAL]
    return DualMix(model)


def mean_pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the hidden states over the real tokens (never a padding token)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def cosine_to(reps: Tensor, reference: Tensor) -> Tensor:
    """Mean cosine similarity of each row of ``reps`` to the rows of ``reference``, per row."""
    a = F.normalize(reps.double(), dim=-1)
    b = F.normalize(reference.double(), dim=-1)
    return (a @ b.T).mean(-1)


__all__ = ["LOCAL", "CoreB", "DualMix", "SparseDelta", "add_local_adapter", "basis_gain", "cosine_to", "install_core",
           "install_sparse", "lora_layers", "mean_pooled"]
