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
- **experts** (FedLEASE): ``y = W0x + s·Σ_e ω_e(x)·B_eA_e x`` over E LoRA experts with a router
  (:class:`ExpertsA`, :class:`ExpertsB`): ``lora_A`` holds expert 0's A as ``weight`` and the others' in ``more``,
  the router ``G`` (Linear k→2E−1 with bias, zero) and the slot map ``slots`` (each slot's expert, −1 unused);
  ``lora_B`` holds the B's the same way. The handle reads expert 0 as the layer's factors (B, A); the rest are
  other trainables the method names.
- **summed** (HiLoRA's leaf tier): a second LoRA adapter on the same layers whose path is added to the default
  one: ``y = W0x + s·B A x + s·B_l A_l x`` (:class:`SummedAdapter`). PEFT's init (B_l = 0) adds nothing.
- **QR offset** (ILoRA): the adapter starts from the QR part ``T_r = Q[:, :r] R[:r]`` of each base weight W0
  (``lora_B = Q[:, :r]``, ``lora_A = R[:r]/s``) and the base holds ``W0 − T_r`` (folded once, at build, and
  recorded as a build fold the handle reads: :data:`BUILD_FOLD`), so the model starts at W0 exactly. A client of
  a lower rank ρ has the offset ``−T_ρ``: a forward hook adds the frozen tail ``Q[:, ρ:r] R[ρ:r]`` (buffers, not
  trainables; ρ is the rank the handle last loaded, :data:`LOADED_RANK`). One base in memory; with one rank the
  hook adds nothing.
- **sparse** (SLoRA's stage 1): a :class:`SparseDelta` beside the LoRA path, ``W = W0 + scatter_Ω(v) + s·BA``: a
  fixed seeded index set Ω (a buffer, the same in every process) and a trainable ``v`` (zero at start), added by a
  forward hook (:func:`install_sparse`). Once ``off`` (SLoRA's switch: v is zero from then on) the hook adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.utils import transpose
from torch import Tensor, nn

LOCAL = "local"  # the name of FedDPA's second (private) adapter
LEAF = "leaf"  # the name of HiLoRA's summed leaf adapter
# Attributes set on a PEFT LoRA layer: the update folded into its base weight while the structure was built (in
# the weight's own layout; AdapterHandle starts its ``folded`` from it), and the rank of the client whose factors
# the handle last loaded (AdapterHandle.set; structures whose effect depends on the client's rank read it).
BUILD_FOLD, LOADED_RANK = "fedlora_build_fold", "fedlora_loaded_rank"


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


def slot_map(cluster: int, experts: int) -> list[int]:
    """The expert of each of the 2M−1 router slots of a client in ``cluster``: M times c, then the others in order."""
    if not 0 <= cluster < experts:
        raise ValueError(f"cluster {cluster} is not one of the {experts} experts")
    return [cluster] * experts + [e for e in range(experts) if e != cluster]


def routing_weights(logits: Tensor, slots: Tensor, n_experts: int) -> Tensor:
    """``ω`` (…, n_experts) from router ``logits`` (…, S) and ``slots`` (S: each slot's expert, −1 for an unused
    slot, so a model sized for more experts than the clustering found routes over the 2M−1 used ones): softmax over
    the used slots, the top-M (M = (used+1)/2) kept, ties to the lower slot, summed per expert, not renormalised."""
    used = slots >= 0
    m = (int(used.sum()) + 1) // 2
    p = torch.softmax(logits.masked_fill(~used, float("-inf")), dim=-1)
    order = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices  # stable: ties keep the lower slot
    chosen = torch.zeros_like(p).scatter(-1, order[..., :m], 1.0)
    expert = slots.clamp_min(0).long().expand_as(p)
    return torch.zeros(*p.shape[:-1], n_experts, dtype=p.dtype, device=p.device).scatter_add(-1, expert, p * chosen)


class ExpertsA(nn.Module):
    """``lora_A`` of the experts structure: ``x ↦ [ω_e(x)·A_e x]_e`` (…, E·r), ``ω`` from the router ``G`` and the slot
    map (:func:`routing_weights`). Each expert's A is its own parameter, so freezing one
    is ``requires_grad`` on it. ``slots`` is per-client state held like a trainable and never trained (the method
    freezes it every round); with the default map ``[0, −1, …]`` the layer is plain LoRA on expert 0."""

    def __init__(self, A0: Tensor, experts: int):
        super().__init__()
        r, k = A0.shape
        self.weight = nn.Parameter(A0)
        self.more = nn.ParameterList([nn.Parameter(A0.new_zeros(r, k)) for _ in range(experts - 1)])
        self.router = nn.Linear(k, 2 * experts - 1, bias=True, device=A0.device, dtype=A0.dtype)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        default = torch.full((2 * experts - 1,), -1.0, dtype=A0.dtype, device=A0.device)
        default[0] = 0.0
        self.slots = nn.Parameter(default)

    def experts(self) -> list[Tensor]:
        return [self.weight, *self.more]

    def forward(self, x: Tensor) -> Tensor:
        A = torch.stack(self.experts())  # E×r×k
        z = torch.einsum("erk,...k->...er", A.to(x.dtype), x)
        omega = routing_weights(self.router(x.to(self.router.weight.dtype)), self.slots.detach().round(), A.shape[0])
        return (z * omega.to(z.dtype).unsqueeze(-1)).flatten(-2)


class ExpertsB(nn.Module):
    """``lora_B`` of the experts structure: ``z ↦ Σ_e B_e z_e`` (z: …, E·r, as :class:`ExpertsA` gives it)."""

    def __init__(self, B0: Tensor, experts: int):
        super().__init__()
        self.weight = nn.Parameter(B0)
        self.more = nn.ParameterList([nn.Parameter(torch.zeros_like(B0)) for _ in range(experts - 1)])

    def experts(self) -> list[Tensor]:
        return [self.weight, *self.more]

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, torch.cat(self.experts(), dim=1).to(z.dtype))


@torch.no_grad()
def install_experts(model: nn.Module, experts: int) -> None:
    """Turn every LoRA layer of ``model`` into the experts structure with ``experts`` slots for experts: expert 0 is the
    layer's LoRA as PEFT initialised it, the others zero, the router zero, the slot map plain LoRA on expert 0."""
    if experts < 1:
        raise ValueError(f"an experts structure needs at least one expert, not {experts}")
    for _, layer in lora_layers(model):
        A0, B0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        layer.lora_A["default"] = ExpertsA(A0.detach().clone(), experts)
        layer.lora_B["default"] = ExpertsB(B0.detach().clone(), experts)


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


class SummedAdapter:
    """HiLoRA's leaf tier: a forward hook on every LoRA layer adds ``s_l·B_l A_l x`` of adapter ``name`` to PEFT's
    output (nothing while adapters are disabled)."""

    def __init__(self, model: nn.Module, name: str = LEAF):
        self.name = name
        self.layers = [layer for _, layer in lora_layers(model) if name in layer.lora_A]
        for layer in self.layers:
            layer.register_forward_hook(self._hook)

    def _hook(self, layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if layer.disable_adapters:
            return output
        n = self.name
        x = args[0].to(layer.lora_A[n].weight.dtype)
        return output + (layer.lora_B[n](layer.lora_A[n](layer.lora_dropout[n](x))) * layer.scaling[n]).to(output.dtype)


def add_adapter_copy(model: nn.Module, config, name: str) -> None:
    """A second LoRA adapter ``name`` on the same layers (``config``: the default adapter's PEFT config), its factors
    trainable, without a task head of its own (PEFT copies the head for a new adapter; the head stays the default's)."""
    model.add_adapter(name, config)
    for pname, p in model.named_parameters():
        if f".{name}." in pname and ".lora_" in pname:
            p.requires_grad_(True)
    for module in model.modules():
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and name in saved:
            del saved[name]


def add_local_adapter(model: nn.Module, config) -> DualMix:
    """FedDPA: add the private ``local`` LoRA (``config``: the global adapter's PEFT config, without a head of its
    own), make its factors trainable, and return the mix that combines the two."""
    add_adapter_copy(model, config, LOCAL)
    return DualMix(model)


def add_summed_adapter(model: nn.Module, config, name: str = LEAF) -> SummedAdapter:
    """HiLoRA: add the leaf LoRA ``name``, whose path is added to the default adapter's."""
    add_adapter_copy(model, config, name)
    return SummedAdapter(model, name)


class QROffset:
    """ILoRA's frozen offset on every LoRA layer (see the module docstring): the base holds ``W0 − T_r``; for a
    client of rank ρ < r a forward hook adds ``Q[:, ρ:r] R[ρ:r] x`` so its base is ``W0 − T_ρ``."""

    def __init__(self, model: nn.Module, rank: int, scale: float, qr: Callable[[Tensor, int], tuple[Tensor, Tensor]]):
        """``qr(W, r)``: the method's ``(Q[:, :r], R[:r])`` of a d×k weight W (float64)."""
        self.rank = rank
        for name, layer in lora_layers(model):
            weight = layer.get_base_layer().weight
            flip = bool(getattr(layer, "fan_in_fan_out", False))
            W = transpose(weight.detach(), flip).to(torch.float64)  # d×k
            if rank > min(W.shape):
                raise ValueError(f"ilora: rank {rank} exceeds what layer {name} ({W.shape[0]}×{W.shape[1]}) can hold; pass a smaller --rank")
            Q, R = qr(W, rank)
            step = transpose(-(Q @ R), flip).to(weight.dtype)
            with torch.no_grad():
                weight.add_(step)
                layer.lora_B["default"].weight.copy_(Q.to(weight.dtype))
                layer.lora_A["default"].weight.copy_((R / scale).to(weight.dtype))
            setattr(layer, BUILD_FOLD, step)
            layer.register_buffer("qr_offset_Q", Q.to(weight.dtype), persistent=False)
            layer.register_buffer("qr_offset_R", R.to(weight.dtype), persistent=False)
            layer.register_forward_hook(self._hook)

    def _hook(self, layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        rho = getattr(layer, LOADED_RANK, self.rank)
        if rho >= self.rank:
            return output
        x = args[0].to(layer.qr_offset_R.dtype)
        tail = F.linear(F.linear(x, layer.qr_offset_R[rho:]), layer.qr_offset_Q[:, rho:])
        return output + tail.to(output.dtype)


def mean_pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the hidden states over the real tokens (never a padding token)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def cosine_to(reps: Tensor, reference: Tensor) -> Tensor:
    """Mean cosine similarity of each row of ``reps`` to the rows of ``reference``, per row."""
    a = F.normalize(reps.double(), dim=-1)
    b = F.normalize(reference.double(), dim=-1)
    return (a @ b.T).mean(-1)


__all__ = ["BUILD_FOLD", "LEAF", "LOADED_RANK", "LOCAL", "CoreB", "DualMix", "ExpertsA", "ExpertsB", "QROffset",
           "SparseDelta", "SummedAdapter", "add_adapter_copy", "add_local_adapter", "add_summed_adapter",
           "basis_gain", "cosine_to", "install_core", "install_experts", "install_sparse", "lora_layers",
           "mean_pooled", "routing_weights", "slot_map"]
