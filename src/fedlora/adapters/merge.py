"""Merging an adapted model into plain weights: every adapted layer becomes the base layer it wraps, holding the
weight the adapter makes of it (``fedlora export --merged``).

Our choice: the merged weight of an adapted layer is read off the layer's own forward, in float64 on a copy of it:
``b = f(0)`` and ``W = (f(I) − f(0))ᵀ`` (d×k), which is the adapter's definition whatever its kind or structure —
``W0 + s·BA`` (LoRA, rsLoRA), ``m ⊙ (W0 + sBA)/‖W0 + sBA‖_row`` (DoRA), ``W0 + Λ_b B Λ_d A`` (VeRA),
``W0 + W0 ⊙ BA`` (HiRA), the core and sparse structures (Fed-SB, RAVAN, SLoRA) and folds already in ``W0``. PEFT's
``merge_and_unload`` computes the same weights for PEFT's own kinds (the tests hold the two equal) but not for our
structures. A layer whose output is not one fixed affine map of its input (FedLEASE's top-M router) is refused, as
is one whose affine part adds a bias its base layer has no room for. Imports torch and PEFT only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

AFFINE_TOL = 1e-9  # relative: the probe is float64, so a fixed affine map reproduces itself to ~1e-15


class NotMergeable(ValueError):
    """A layer whose output is not a fixed affine map of its input: no plain weight holds it."""


@torch.no_grad()
def effective_linear(layer: nn.Module, name: str = "") -> tuple[Tensor, Tensor]:
    """``(W, b)`` of an adapted linear layer in float64: ``W`` d×k (out×in, whatever the base layer's layout), ``b``
    of length d; raises :class:`NotMergeable` when a random input shows the layer is not ``x ↦ Wx + b``."""
    probe = copy.deepcopy(layer).to(torch.float64).eval()
    k = int(layer.in_features)
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    zero = probe(torch.zeros(1, k, dtype=torch.float64, device=device))[0]
    W = (probe(torch.eye(k, dtype=torch.float64, device=device)) - zero).T.contiguous()
    x = torch.randn(4, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    got, want = probe(x), x @ W.T + zero
    if (got - want).abs().max() > AFFINE_TOL * max(1.0, float(want.abs().max())):
        raise NotMergeable(f"layer {name or type(layer).__name__} is not a fixed linear map of its input (its adapter depends on "
                           "the input, e.g. a router), so no single weight holds it")
    return W, zero


def merged_layer(layer: nn.Module, name: str = "") -> nn.Module:
    """A copy of ``layer``'s base layer (``nn.Linear`` or transformers' ``Conv1D``, in×out) holding its merged weight
    and bias, in the base layer's dtype."""
    base = layer.get_base_layer()
    W, b = effective_linear(layer, name)
    new = copy.deepcopy(base)
    weight = W.T if bool(getattr(layer, "fan_in_fan_out", False)) else W  # Conv1D stores k×d
    if tuple(weight.shape) != tuple(new.weight.shape):
        raise NotMergeable(f"layer {name}: merged weight {tuple(weight.shape)} does not fit its base weight {tuple(new.weight.shape)}")
    new.weight.data = weight.to(new.weight.dtype).contiguous()
    if getattr(new, "bias", None) is not None:
        new.bias.data = b.to(new.bias.dtype).contiguous()
    elif b.abs().max() > AFFINE_TOL * max(1.0, float(W.abs().max())):
        raise NotMergeable(f"layer {name}: the adapter adds a bias to a layer built without one; no plain checkpoint of this model holds it")
    new.weight.requires_grad_(False)
    return new


def merge_into_base(peft_model: nn.Module) -> nn.Module:
    """The PEFT model's base model with every adapted layer replaced by :func:`merged_layer` and every wrapped module
    (PEFT's ``modules_to_save``: the trained head) by its active copy. Consumes ``peft_model``'s base model: the
    replaced modules are gone from it afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    peft_model.eval()
    inner = peft_model.get_base_model()
    todo = [(n, m) for n, m in inner.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    replaced = {}
    for name, module in todo:
        if any(name.startswith(p + ".") for p in replaced):
            continue  # inside a module already replaced
        if isinstance(module, ModulesToSaveWrapper):
            new = copy.deepcopy(module.modules_to_save[module.active_adapter if isinstance(module.active_adapter, str) else module.active_adapters[0]])
        else:
            new = merged_layer(module, name)
        replaced[name] = new
    for name, new in replaced.items():
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent) if parent else inner, child, new)
    for p in inner.parameters():
        p.requires_grad_(False)
    return inner
