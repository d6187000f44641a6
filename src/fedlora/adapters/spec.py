"""Which adapter a run uses, as one validated dataclass that builds the PEFT config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import peft

ADAPTERS: tuple[str, ...] = ("lora", "rslora", "dora", "vera", "hira")
# Adapters whose clients may have different ranks on one base model: a client of rank r_u uses the first r_u
# components of the model's r_max and the scale s(r_u). VeRA's rank is that of its frozen shared projections.
MIXED_RANK_ADAPTERS: tuple[str, ...] = ("lora", "rslora", "dora", "hira")


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA-family adapter from PEFT.

    ``kind``: ``lora`` (scaling α/r), ``rslora`` (α/√r), ``dora`` (LoRA plus a trained magnitude vector),
    ``vera`` (frozen shared random B, A; trained vectors λ_b ∈ R^d, λ_d ∈ R^r), ``hira`` (ΔW = W0 ⊙ BA).
    ``alpha`` is ignored by VeRA and HiRA, which have no scaling in PEFT. ``fan_in_fan_out``: the targets store
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
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.kind!r}; choose one of {', '.join(ADAPTERS)}")
        if int(self.r) < 1:
            raise ValueError(f"adapter rank r={self.r} is below 1; pass a rank of at least 1 (e.g. --rank 8)")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be positive; pass e.g. --lora-alpha 16")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout={self.dropout} is outside [0, 1); pass e.g. 0.0 or 0.1")
        if not self.target_modules:
            raise ValueError("no target modules given; pass the names of the linear layers to adapt, e.g. query,value")

    @property
    def scaling(self) -> float:
        """The common scale s of ΔW = s·BA (DESIGN.md: it factors out of every aggregation formula)."""
        return self.scale_at(self.r)

    def scale_at(self, rank: int) -> float:
        """The scale s_u of a client of rank ``rank``: α/r (rsLoRA α/√r); 1 for VeRA and HiRA (no scaling in PEFT)."""
        if self.kind == "rslora":
            return self.alpha / rank**0.5
        if self.kind in ("lora", "dora"):
            return self.alpha / rank
        return 1.0

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
        if self.kind == "vera":
            # VeRA's shared random B, A are rebuilt from this key, so every client holds the same ones.
            return peft.VeraConfig(vera_dropout=self.dropout, projection_prng_key=0, save_projection=True, **common)
        if self.kind == "hira":
            return peft.HiraConfig(hira_dropout=self.dropout, **common)
        return peft.LoraConfig(
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_rslora=self.kind == "rslora",
            use_dora=self.kind == "dora",
            **common,
        )
