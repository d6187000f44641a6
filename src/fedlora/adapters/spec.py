"""Which adapter a run uses, as one validated dataclass that builds the PEFT config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import peft

from fedlora.adapters.kinds import AdapterKind, adapter_kind


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA-family adapter from PEFT.

    ``kind``: ``lora`` (scaling α/r), ``rslora`` (α/√r), ``dora`` (LoRA plus a trained magnitude vector),
    ``vera`` (frozen shared random B, A; trained vectors λ_b ∈ R^d, λ_d ∈ R^r), ``hira`` (ΔW = W0 ⊙ BA).
    :attr:`variant` is the kind's object (:mod:`fedlora.adapters.kinds`), which does everything that differs between
    kinds. ``alpha`` is ignored by VeRA and HiRA, which have no scaling in PEFT. ``fan_in_fan_out``: the targets store
    their weight transposed, in×out (transformers' ``Conv1D``, GPT-2-style models); :meth:`for_model` sets it.
    """

    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = field(default=())
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        adapter_kind(self.kind)  # an unknown name fails here, naming the choices
        if int(self.r) < 1:
            raise ValueError(f"adapter rank r={self.r} is below 1; pass a rank of at least 1 (e.g. --rank 8)")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be positive; pass e.g. --lora-alpha 16")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout={self.dropout} is outside [0, 1); pass e.g. 0.0 or 0.1")
        if not self.target_modules:
            raise ValueError("no target modules given; pass the names of the linear layers to adapt, e.g. query,value")

    @property
    def variant(self) -> AdapterKind:
        """The object of this spec's adapter kind (its factors, write, fold, fresh init, PEFT config, traits)."""
        return adapter_kind(self.kind)

    @property
    def scaling(self) -> float:
        """The common scale s of ΔW = s·BA (DESIGN.md: it factors out of every aggregation formula)."""
        return self.scale_at(self.r)

    def scale_at(self, rank: int) -> float:
        """The scale s_u of a client of rank ``rank``: α/r (rsLoRA α/√r); 1 for VeRA and HiRA (no scaling in PEFT)."""
        return self.variant.scale(self.alpha, rank)

    def for_model(self, model) -> AdapterSpec:
        """This spec with ``fan_in_fan_out`` set as ``model``'s targets need it: True where they are transformers'
        ``Conv1D`` layers (weight stored in×out). PEFT would otherwise warn and set it itself, per layer (LoRA and
        VeRA also in the shared config, HiRA only on the layer); the factors are d×r and r×k either way."""
        from peft.tuners.tuners_utils import check_target_module_exists
        from transformers.pytorch_utils import Conv1D

        config = self.peft_config(None)
        targets = [m for name, m in model.named_modules() if name and check_target_module_exists(config, name)]
        transposed = bool(targets) and all(isinstance(m, Conv1D) for m in targets)
        return self if transposed == self.fan_in_fan_out else dataclasses.replace(self, fan_in_fan_out=transposed)

    def peft_config(self, task_type: str | None) -> peft.PeftConfig:
        common = dict(
            r=self.r,
            target_modules=list(self.target_modules),
            task_type=task_type,
            modules_to_save=list(self.modules_to_save) or None,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        return self.variant.peft_config(self, common)
