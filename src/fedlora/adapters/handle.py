"""Reading and writing one client's trainable tensors on the single shared PEFT model.

The simulator keeps ONE model in memory. A client "is" the set of trainable tensors loaded into it while it
trains; this handle moves those tensors in and out as ``dict[str, Tensor]`` keyed by parameter name, exposes
each adapted module's factors ``(B, A)`` for the aggregation math, and folds server updates into the frozen base.
What differs between adapter kinds (VeRA's vectors, HiRA's fold, DoRA's magnitude…) is asked of the spec's kind
object (:mod:`fedlora.adapters.kinds`), never decided here by its name.

Orientation: every factor product and weight-space update here is d×k (out×in, ``B A``), whatever the layer. A base
weight may be stored transposed, k×d (in×out: transformers' ``Conv1D`` in GPT-2-style models, which PEFT marks with
``fan_in_fan_out``); :meth:`AdapterHandle.base_layout` converts between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from peft.utils import transpose
from torch import Tensor, nn

from fedlora.adapters.kinds import MATRIX
from fedlora.adapters.spec import AdapterSpec
from fedlora.adapters.structures import BUILD_FOLD, LOADED_RANK, CoreB
from fedlora.aggregation import Aggregate, block_diagonal


@dataclass(frozen=True)
class ModuleKeys:
    """Names, in the trainables dict, of one adapted module's factor tensors."""

    B: str  # LoRA/DoRA/HiRA: the d×r factor; VeRA: λ_b ∈ R^d; core structure: the frozen basis B (d×hr)
    A: str  # LoRA/DoRA/HiRA: the r×k factor; VeRA: λ_d ∈ R^r; core structure: the frozen basis A (hr×k)
    core: str | None = None  # core structure (Fed-SB, RAVAN): the trainable h×r×r cores between the bases
    gain: str | None = None  # RAVAN: the trainable per-head scalars
    sparse: str | None = None  # sparse structure (SLoRA's stage 1): the trainable values v of W0 + scatter_Ω(v)


class AdapterHandle:
    """The adapter view of a PEFT model: factors per module, other trainables, base-weight folding."""

    def __init__(self, model: nn.Module, spec: AdapterSpec):
        self.model = model
        self.spec = spec
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.layers: dict[str, nn.Module] = {}
        self.keys: dict[str, ModuleKeys] = {}
        self.kind = spec.variant
        b_attr, a_attr = self.kind.b_attr, self.kind.a_attr
        for name, module in model.named_modules():
            if hasattr(module, b_attr) and hasattr(module, "get_base_layer") and "default" in getattr(module, b_attr):
                short = name.removeprefix("base_model.model.")
                self.layers[short] = module
                core = getattr(module, b_attr)["default"]
                if isinstance(core, CoreB):
                    prefix = f"{name}.{b_attr}.default"
                    self.keys[short] = ModuleKeys(B=f"{prefix}.weight", A=self._find(name, a_attr), core=f"{prefix}.core",
                                                  gain=f"{prefix}.gain" if core.gain is not None else None)
                else:
                    self.keys[short] = ModuleKeys(B=self._find(name, b_attr), A=self._find(name, a_attr))
                if getattr(module, "sparse_delta", None) is not None:
                    self.keys[short] = replace(self.keys[short], sparse=f"{name}.sparse_delta.values")
        # Core structure (Fed-SB, RAVAN): B and A are frozen shared bases; a client's factors are B·blockdiag(cores), A.
        self.cored = any(k.core for k in self.keys.values())
        # Sparse structure (SLoRA): a trainable v per module beside the factors, W = W0 + scatter_Ω(v) + s·BA.
        self.sparse = any(k.sparse for k in self.keys.values())
        # Σ of every weight-space update folded into each base weight, in that weight's own layout (k×d where it
        # is stored transposed): exactly what was added to it.
        # A structure may fold into the base while it is built (ILoRA's offset, BUILD_FOLD): that counts too.
        self.folded: dict[str, Tensor] = {m: getattr(layer, BUILD_FOLD).clone() for m, layer in self.layers.items()
                                          if getattr(layer, BUILD_FOLD, None) is not None}
        # Mixed ranks: the model holds rank r_max = spec.r; a client of rank r_u uses the first r_u components (the
        # rest are zero, and stay zero in training: their gradients vanish with the zero partner) at scale s(r_u).
        self.rank = spec.r
        self.rank_dim: dict[str, int] = {}  # factor tensor name -> its rank dimension (B: 1, A: 0)
        if self.kind.factor_form == MATRIX and not self.cored:
            for k in self.keys.values():
                self.rank_dim[k.B], self.rank_dim[k.A] = 1, 0
        self._scaling = {m: layer.scaling["default"] for m, layer in self.layers.items()
                         if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling}
        if not self.layers:
            raise ValueError(
                f"the adapter targets {list(spec.target_modules)} matched no layer of the model; "
                "pass --target-modules with names of its linear layers (e.g. query,value for BERT, q_proj,v_proj for Llama)"
            )
        # Layers whose base weight is stored k×d (in×out), as PEFT set them up: its own flag, per layer.
        self.transposed: dict[str, bool] = {m: bool(getattr(layer, "fan_in_fan_out", False)) for m, layer in self.layers.items()}
        for module, layer in self.layers.items():
            base = layer.get_base_layer()
            shape = tuple(self.base_layout(module, base.weight).shape)
            if shape != (getattr(layer, "out_features", None), getattr(layer, "in_features", None)):
                raise ValueError(
                    f"layer {module} ({type(base).__name__}, weight {tuple(base.weight.shape)}) is not a linear layer whose weight is "
                    "out×in (nn.Linear) or in×out (transformers' Conv1D); pass --target-modules with names of such layers only"
                )
        for module, layer in self.layers.items():
            d, k = layer.out_features, layer.in_features
            if spec.r > min(d, k):
                raise ValueError(f"adapter rank {spec.r} exceeds what layer {module} ({d}×{k}) can hold (a rank above min(d, k) = {min(d, k)} "
                                 f"adds nothing and costs memory); pass --rank {min(d, k)} or less (under --client-ranks: "
                                 f"no client rank above {min(d, k)})")
        factor_names = {n for k in self.keys.values() for n in (k.B, k.A, k.core, k.gain, k.sparse) if n}
        self.trainable_names: list[str] = [n for n, p in self._params.items() if p.requires_grad]
        self.trainable_set: frozenset[str] = frozenset(self.trainable_names)
        self.other_names: list[str] = [n for n in self.trainable_names if n not in factor_names]
        # The task head (PEFT's modules_to_save, e.g. the classifier): what FedSA keeps local by default. Other
        # non-factor trainables (DoRA's magnitude vectors) are adapter state and are shared.
        self.head_names: list[str] = [n for n in self.other_names if ".modules_to_save." in n]

    def _find(self, module_name: str, attr: str) -> str:
        prefix = f"{module_name}.{attr}.default"
        for n in (prefix, prefix + ".weight"):
            if n in self._params:
                return n
        raise KeyError(f"PEFT layer {module_name} has no parameter {prefix}")

    # ---- moving tensors in and out of the shared model -------------------------------------------------------
    def get(self, names: list[str] | None = None, *, rank: int | None = None) -> dict[str, Tensor]:
        """Detached copies of trainable tensors (all of them by default); factors cut to ``rank`` components."""
        names = self.trainable_names if names is None else names
        out = {n: self._params[n].detach().clone() for n in names}
        return out if rank is None or rank == self.rank else self.truncate(out, rank)

    @torch.no_grad()
    def set(self, tensors: dict[str, Tensor], *, rank: int | None = None, scale: float | None = None) -> None:
        """Load trainables into the model. Factors of a lower rank fill the first components (the rest zero);
        ``rank`` also sets every layer's scale to that rank's s(r) (the model's own at ``None``), or to ``scale``
        where given (FSLoRA's sketch of rank k trains at s(r)·r/k)."""
        for n, t in tensors.items():
            p = self._params.get(n)
            if p is None:
                raise KeyError(f"the model has no trainable tensor {n!r}")
            if t.shape != p.shape and n in self.rank_dim:
                dim = self.rank_dim[n]
                p.zero_()
                p.narrow(dim, 0, t.shape[dim]).copy_(t)
            else:
                p.copy_(t)
        target = scale if scale is not None else self.spec.scale_at(self.rank if rank is None else rank)
        ratio = target / self.spec.scale_at(self.rank)
        for module, s in self._scaling.items():
            self.layers[module].scaling["default"] = s * ratio
        for layer in self.layers.values():  # the loaded client's rank, for structures that depend on it (ILoRA's offset)
            setattr(layer, LOADED_RANK, self.rank if rank is None else rank)

    def truncate(self, tensors: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
        """The first ``rank`` components of every factor in ``tensors`` (other tensors as they are)."""
        return {n: t.narrow(self.rank_dim[n], 0, rank) if n in self.rank_dim and t.shape[self.rank_dim[n]] > rank else t
                for n, t in tensors.items()}

    def at_rank(self, tensors: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
        """Global factors (rank r_max, scale s(r_max)) as a client of rank ``rank`` holds them: the first ``rank``
        components, each factor times √(s(r_max)/s(rank)) so that ``s(rank)·B A`` is the truncated global product
        (METHODS.md, mixed ranks: the scaled factors √s·B, √s·A are what clients share)."""
        if rank == self.rank:
            return tensors
        c = (self.spec.scale_at(self.rank) / self.spec.scale_at(rank)) ** 0.5
        cut = self.truncate(tensors, rank)
        return {n: t * c if n in self.rank_dim else t for n, t in cut.items()}

    def write_factors(self, layers: dict[str, Aggregate], uploads: list[dict[str, Tensor]], out: dict[str, Tensor],
                      *, B: bool = True, A: bool = True) -> None:
        """Write each module's broadcast factors into trainables ``out``, padded with zeros to the model's rank.

        The kind writes them (:meth:`AdapterKind.write`): VeRA's factors are ``diag(λ)·shared``, so its vectors are
        combined with the aggregate's coefficients p, q."""
        for module, agg in layers.items():
            k = self.keys[module]
            for on, name, t, coef in ((B, k.B, agg.B, agg.p), (A, k.A, agg.A, agg.q)):
                if on and (written := self.kind.write(self, name, t, uploads, coef)) is not None:
                    out[name] = written

    def pad(self, name: str, t: Tensor) -> Tensor:
        """Factor ``t`` zero-padded to the model's rank (as it is when already full)."""
        dim, full = self.rank_dim[name], self._params[name].shape
        if t.shape[dim] >= full[dim]:
            return t
        out = t.new_zeros(full)
        out.narrow(dim, 0, t.shape[dim]).copy_(t)
        return out

    def set_trainable(self, names: list[str], trainable: bool) -> None:
        for n in names:
            self._params[n].requires_grad_(trainable)

    def parameter(self, name: str) -> nn.Parameter:
        """The model's parameter ``name`` itself (for loss terms that need a gradient)."""
        return self._params[name]

    def B_names(self) -> list[str]:
        return [k.B for k in self.keys.values()]

    def A_names(self) -> list[str]:
        return [k.A for k in self.keys.values()]

    # ---- the factor view used by the aggregation math ---------------------------------------------------------
    def factors(self, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-module ``(B_u, A_u)`` with ΔW_u = s·B_u A_u (s common to all clients, see DESIGN.md).

        The kind reads them (:meth:`AdapterKind.factors`): VeRA's client factors are ``B_u = diag(λ_b,u)·B`` and
        ``A_u = diag(λ_d,u)·A`` over its frozen shared B, A. A missing key gives no entry (e.g. FedSA uploads no B).
        """
        Bs, As = {}, {}
        for module, k in self.keys.items():
            if k.core:  # the bases as held in ``tensors`` (the model's where not given: they are shared)
                if k.core in tensors:
                    B = tensors[k.B] if k.B in tensors else self._params[k.B].detach()
                    Bs[module] = B @ block_diagonal(self.core_of(tensors, module))
                As[module] = tensors[k.A] if k.A in tensors else self._params[k.A].detach()
            else:
                B, A = self.kind.factors(self.layers[module], tensors.get(k.B), tensors.get(k.A))
                if B is not None:
                    Bs[module] = B
                if A is not None:
                    As[module] = A
        return Bs, As

    def core_of(self, tensors: dict[str, Tensor], module: str) -> Tensor:
        """Core structure: ``module``'s effective cores ``g_i H_i`` (h×r×r) in ``tensors`` (a gain not given is 1)."""
        k = self.keys[module]
        core = tensors[k.core]
        if k.gain is None or k.gain not in tensors:
            return core
        return core * tensors[k.gain].to(core.dtype)[:, None, None]

    def core_names(self) -> list[str]:
        return [k.core for k in self.keys.values() if k.core]

    def gain_names(self) -> list[str]:
        return [k.gain for k in self.keys.values() if k.gain]

    def sparse_names(self) -> list[str]:
        return [k.sparse for k in self.keys.values() if k.sparse]

    def sparse_delta(self, tensors: dict[str, Tensor], module: str) -> Tensor:
        """Sparse structure: ``module``'s d×k ``scatter_Ω(v)`` for the v in ``tensors`` (the model's where not given)."""
        k = self.keys[module]
        sparse = self.layers[module].sparse_delta
        return sparse.dense(tensors.get(k.sparse, self._params[k.sparse]).detach())

    def scaling(self, module: str) -> float:
        """The model's own scale s(r_max) of ``module`` (whatever client rank its layers are set to now)."""
        return float(self._scaling.get(module, 1.0))

    # ---- server updates applied to the frozen base ------------------------------------------------------------
    def base_layout(self, module: str, t: Tensor) -> Tensor:
        """A d×k (out×in) tensor of ``module`` in the layout of its base weight, or a tensor in that layout as d×k:
        the transpose (a view) where the weight is stored k×d (PEFT's ``fan_in_fan_out``), else ``t`` itself."""
        return transpose(t, self.transposed[module])

    @torch.no_grad()
    def fold(self, deltas: dict[str, Tensor], kept: dict[str, Tensor] | None = None) -> None:
        """Add each module's update Δ (d×k) to its frozen base weight: W0 += s·Δ (HiRA: W0 += W0 ⊙ Δ), in the
        weight's own layout (Δᵀ where it is stored k×d); ``folded`` accumulates what was added, in that layout.
        ``kept``: per module the product B̂Â (d×k) the adapter keeps beside the fold, for a kind that needs it
        (``AdapterKind.fold_sees_kept``: HiRA then adds W0 ⊙ Δ ⊘ (1 + B̂Â))."""
        for module, delta in deltas.items():
            weight = self.layers[module].get_base_layer().weight
            delta = self.base_layout(module, delta.to(weight.dtype))
            product = None if kept is None or module not in kept else self.base_layout(module, kept[module].to(weight.dtype))
            step = self.kind.fold_step(weight, delta, self.scaling(module), product)
            weight.add_(step)
            self.folded[module] = self.folded[module] + step if module in self.folded else step.clone()

    @torch.no_grad()
    def fresh_factors(self, seed: int, *, rank: int | None = None) -> dict[str, Tensor]:
        """A new seeded initialisation of every module's factors (FLoRA re-initialises each round).

        Same as PEFT's default init: A Kaiming-uniform, B zero (VeRA: λ_b = 0, λ_d = 0.1). For DoRA the magnitude
        vector is re-derived from the current base weight, as PEFT does at creation. ``rank``: the first ``rank``
        components of the model's (a client of that rank re-initialises as PEFT would at its own rank).
        """
        gen = torch.Generator().manual_seed(int(seed))
        out: dict[str, Tensor] = {}
        for module in self.keys:
            out.update(self.kind.fresh(self, module, gen))
        return out if rank is None else self.truncate(out, rank)

