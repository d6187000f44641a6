"""One object per adapter kind: what LoRA, rsLoRA, DoRA, VeRA and HiRA each do differently.

Everything that depends on the adapter kind lives on its :class:`AdapterKind`, as PEFT's ``LoraVariant`` holds
DoRA's layer math (``peft/tuners/lora/variants.py``): the PEFT config it builds, where its factors live on a PEFT
layer, its scale s(r), how the client factors ``(B_u, A_u)`` of DESIGN.md are read from its trainables and written
back from an aggregate, how a server update is folded into the frozen base, its fresh initialisation, and the traits
the rest of the library asks instead of comparing names (``factor_form``, ``mixed_ranks``, ``per_example_grads``,
``exports_as_lora``). :data:`ADAPTERS` maps each name to its object; ``AdapterSpec.variant`` is the run's.

What is shared and what is private is the same for every kind: the B-side and A-side trainables are the factors (a
method says which it keeps local), other adapter state (DoRA's magnitude vector) is averaged like any other
trainable, and frozen state (VeRA's random projections) is identical on every client by construction.

The kinds hold no state of their own; the handle passes them the layer or itself. Imports torch and PEFT only
(the handle is passed in, never imported): no aggregation rule, no federation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import peft
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fedlora.adapters.handle import AdapterHandle
    from fedlora.adapters.spec import AdapterSpec

MATRIX, VECTOR = "matrix", "vector"  # the two factor forms


class AdapterKind:
    """The plain LoRA contract: trainable factors ``B`` (d×r, ``lora_B``) and ``A`` (r×k, ``lora_A``), ΔW = s·BA.

    Subclasses override what their kind does differently; every method gets the layer or the handle it works on.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    b_attr: ClassVar[str] = "lora_B"  # the PEFT layer's ModuleDict/ParameterDict holding the B-side trainable
    a_attr: ClassVar[str] = "lora_A"
    # ``matrix``: the trainables are the factors B_u, A_u themselves (cut and padded along their rank dimension);
    # ``vector``: diagonal scalings of frozen shared factors, combined only with coefficients over the clients.
    factor_form: ClassVar[str] = MATRIX
    mixed_ranks: ClassVar[bool] = True  # clients of different ranks can share one base model (the first r_u components)
    per_example_grads: ClassVar[bool] = False  # Opacus computes per-example gradients for its layers (example-level DP)
    # The global model (factors plus whatever was folded into the base) is exactly a plain PEFT LoRA adapter of the
    # total update: only where ΔW = s·BA adds to W0 with nothing else trained (app/export.py).
    exports_as_lora: ClassVar[bool] = False
    # The adapter's update depends on the base weight (HiRA's W0 ⊙ BA), so a fold next to factors that stay
    # (FedEx-LoRA's residual beside B̂Â) must see them: ``fold_step(…, kept=B̂Â)``.
    fold_sees_kept: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<adapter {self.name}>"

    # ---- configuration -------------------------------------------------------------------------------------------
    def scale(self, alpha: float, rank: int) -> float:
        """The scale s of ΔW = s·BA at rank ``rank``: 1 (no scaling in PEFT) unless the kind has one."""
        return 1.0

    def peft_config(self, spec: AdapterSpec, common: dict) -> peft.PeftConfig:
        """The PEFT config of ``spec``; ``common``: the arguments every kind's config takes (r, targets, head…)."""
        raise NotImplementedError

    # ---- the factor view -----------------------------------------------------------------------------------------
    def factors(self, layer: nn.Module, B: Tensor | None, A: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Client factors ``(B_u, A_u)`` (d×r, r×k) of the trainables ``B``, ``A`` of ``layer`` (None: not given)."""
        return B, A

    def write(self, h: AdapterHandle, name: str, factor: Tensor | None, uploads: list[dict[str, Tensor]],
              coef: Tensor | None) -> Tensor | None:
        """The trainable ``name`` holding an aggregate's factor: ``factor`` itself, zero-padded to the model's rank
        (None where the aggregate has none). ``uploads`` and ``coef`` serve the vector form."""
        return None if factor is None else h.pad(name, factor.contiguous())

    # ---- the frozen base and re-initialisation -------------------------------------------------------------------
    def fold_step(self, weight: Tensor, delta: Tensor, scaling: float, kept: Tensor | None = None) -> Tensor:
        """What a d×k update Δ (in ``weight``'s layout) adds to the frozen base weight: s·Δ.

        ``kept``: the product B̂Â (same layout) the adapter holds after the fold, for a kind whose update is
        multiplied by the base (``fold_sees_kept``); an additive kind ignores it."""
        return delta * scaling

    def fresh(self, h: AdapterHandle, module: str, gen: torch.Generator) -> dict[str, Tensor]:
        """PEFT's default init of ``module``'s trainables: A Kaiming-uniform from ``gen``, B zero."""
        k = h.keys[module]
        b, a = h.parameter(k.B), h.parameter(k.A)
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5) on an r×k matrix gives U(-1/√k, 1/√k)
        A = (torch.rand(a.shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(a.dtype)
        return {k.A: A, k.B: torch.zeros_like(b)}


ADAPTERS: dict[str, AdapterKind] = {}


def register_adapter(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Class decorator: add one instance of ``cls`` to :data:`ADAPTERS` under its name."""
    ADAPTERS[cls.name] = cls()
    return cls


def adapter_kind(name: str) -> AdapterKind:
    """The kind object of adapter ``name``; an unknown name fails in one line naming the choices."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


@register_adapter
class LoRA(AdapterKind):
    """LoRA (Hu et al., 2022): ΔW = (α/r)·BA."""

    name = "lora"
    title = "LoRA"
    use_rslora: ClassVar[bool] = False
    use_dora: ClassVar[bool] = False
    per_example_grads = True  # PEFT's LoRA layers are nn.Linear pairs, which Opacus covers
    exports_as_lora = True

    def scale(self, alpha: float, rank: int) -> float:
        return alpha / rank

    def peft_config(self, spec: AdapterSpec, common: dict) -> peft.PeftConfig:
        return peft.LoraConfig(lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=self.use_rslora,
                               use_dora=self.use_dora, **common)


@register_adapter
class RsLoRA(LoRA):
    """rsLoRA (Kalajdzievski, 2023): LoRA with the rank-stabilised scale α/√r."""

    name = "rslora"
    title = "rsLoRA"
    use_rslora = True

    def scale(self, alpha: float, rank: int) -> float:
        return alpha / rank**0.5


@register_adapter
class DoRA(LoRA):
    """DoRA (Liu et al., 2024): LoRA's factors plus a trained magnitude vector per output row (shared, averaged);
    the layer computes ``m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row``. Opacus crashes on its layers."""

    name = "dora"
    title = "DoRA"
    use_dora = True
    per_example_grads = False
    exports_as_lora = False  # the magnitude normalisation is not an additive update
    magnitude_attr: ClassVar[str] = "lora_magnitude_vector"

    def fresh(self, h: AdapterHandle, module: str, gen: torch.Generator) -> dict[str, Tensor]:
        """LoRA's init, and the magnitude re-derived from the current base weight, as PEFT does at creation."""
        out = super().fresh(h, module, gen)
        layer = h.layers[module]
        mag = getattr(layer, self.magnitude_attr)["default"]
        prefix = f"base_model.model.{module}.{self.magnitude_attr}"
        mag_name = next(n for n in h.other_names if n.startswith(prefix))
        weight = h.base_layout(module, layer.get_base_layer().weight)  # d×k: PEFT's norm of each output row
        out[mag_name] = weight.norm(p=2, dim=1).to(mag.weight.dtype)
        return out


@register_adapter
class VeRA(AdapterKind):
    """VeRA (Kopiczko et al., 2024): frozen shared random B, A (rebuilt from one PRNG key on every client) and
    trainable vectors λ_b ∈ R^d, λ_d ∈ R^r. Client factors ``B_u = diag(λ_b,u)·B``, ``A_u = diag(λ_d,u)·A``, so a
    coefficient method's result (p, q over the clients) stays a pair of vectors. Its rank is that of the shared
    projections: no mixed ranks."""

    name = "vera"
    title = "VeRA"
    b_attr = "vera_lambda_b"
    a_attr = "vera_lambda_d"
    factor_form = VECTOR
    mixed_ranks = False
    d_initial: ClassVar[float] = 0.1  # PEFT's VeraConfig.d_initial default: λ_d starts at 0.1, λ_b at 0

    def peft_config(self, spec: AdapterSpec, common: dict) -> peft.PeftConfig:
        # VeRA's shared random B, A are rebuilt from this key, so every client holds the same ones.
        return peft.VeraConfig(vera_dropout=spec.dropout, projection_prng_key=0, save_projection=True, **common)

    @staticmethod
    def shared(layer: nn.Module) -> tuple[Tensor, Tensor]:
        """``layer``'s slices of the frozen shared projections: B (d×r), A (r×k)."""
        return layer.vera_B["default"][: layer.out_features, :], layer.vera_A["default"][:, : layer.in_features]

    def factors(self, layer: nn.Module, B: Tensor | None, A: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        Bsh, Ash = self.shared(layer)
        return (None if B is None else B.unsqueeze(1) * Bsh), (None if A is None else A.unsqueeze(1) * Ash)

    def write(self, h: AdapterHandle, name: str, factor: Tensor | None, uploads: list[dict[str, Tensor]],
              coef: Tensor | None) -> Tensor | None:
        """The clients' vectors ``name`` combined with the aggregate's coefficients ``coef`` (p for λ_b, q for λ_d;
        None: the rule gave none)."""
        return None if coef is None else combine_vectors([u[name] for u in uploads], coef)

    def fresh(self, h: AdapterHandle, module: str, gen: torch.Generator) -> dict[str, Tensor]:
        k = h.keys[module]
        return {k.B: torch.zeros_like(h.parameter(k.B)), k.A: torch.full_like(h.parameter(k.A), self.d_initial)}


@register_adapter
class HiRA(AdapterKind):
    """HiRA (Huang et al., ICLR 2025): ΔW = W0 ⊙ BA, no scaling. With W0 shared, ``Σ w_u W0⊙(B_uA_u) = W0 ⊙ ΔW*``:
    the same aggregation, and a folded update Δ adds ``W0 ⊙ Δ``.

    A fold beside factors the adapter keeps (FedEx-LoRA's residual R = ΔW* − K beside K = B̂Â) is multiplied by
    them: the new base ``W0 ⊙ (1 + R)`` gives the weight ``W0 ⊙ (1 + R) ⊙ (1 + K)``, a cross term ``W0 ⊙ R ⊙ K``
    off ``W0 ⊙ (1 + ΔW*)``. So such a fold adds ``W0 ⊙ R ⊘ (1 + K)`` instead: the weight is then
    ``W0 ⊙ (1 + K + R) = W0 ⊙ (1 + ΔW*)`` exactly. Our choice where ``|1 + K_ij| < 1e-6`` (HiRA's multiplier nearly
    zeroes that entry whatever the base holds, so no base reaches it): add ``W0 ⊙ R`` there, the plain fold. The
    client computes K from the factors it received: nothing more is sent."""

    name = "hira"
    title = "HiRA"
    b_attr = "hira_B"
    a_attr = "hira_A"

    def peft_config(self, spec: AdapterSpec, common: dict) -> peft.PeftConfig:
        return peft.HiraConfig(hira_dropout=spec.dropout, **common)

    fold_sees_kept = True
    tiny: ClassVar[float] = 1e-6

    def fold_step(self, weight: Tensor, delta: Tensor, scaling: float, kept: Tensor | None = None) -> Tensor:
        if kept is None:
            return weight * delta
        den = 1 + kept.to(delta.dtype)
        return weight * torch.where(den.abs() > self.tiny, delta / den, delta)


def combine_vectors(vectors: list[Tensor], coef: Tensor) -> Tensor:
    """``Σ_u coef_u v_u`` in float64, in the vectors' dtype (VeRA's λ with a rule's coefficients p or q)."""
    stacked = torch.stack(vectors).to(torch.float64)
    return (coef.to(torch.float64) @ stacked).to(vectors[0].dtype)


MIXED_RANK_ADAPTERS: tuple[str, ...] = tuple(n for n, k in ADAPTERS.items() if k.mixed_ranks)
EXAMPLE_DP_ADAPTERS: tuple[str, ...] = tuple(n for n, k in ADAPTERS.items() if k.per_example_grads)
