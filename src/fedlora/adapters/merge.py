"""Merging an adapted model into plain weights: every adapted layer becomes the base layer it wraps, holding the
weight the adapter makes of it (``fedlora export --merged``).

Our choices. A layer exactly as PEFT built it (PEFT's own classes, one adapter, no hook: LoRA, rsLoRA, DoRA, VeRA,
HiRA) is merged by PEFT's own ``merge``, in float64 on a copy: ``W0 + s·BA``, DoRA's ``m ⊙ (W0 + sBA)/‖W0 + sBA‖_row``,
VeRA's ``W0 + Λ_b B Λ_d A``, HiRA's ``W0 + W0 ⊙ BA``; folds are already in ``W0``. A layer PEFT does not know (our
structures: Fed-SB's and RAVAN's cores, SLoRA's sparse delta, ILoRA's offset, FedDPA's second adapter, FedLEASE's
experts) is merged by reading its own forward, in float64 on a copy: ``b = f(0)`` and ``W = (f(I) − f(0))ᵀ`` (d×k),
which is its definition whatever the structure; the tests hold both paths equal on PEFT's kinds. A layer whose output
is not one fixed affine map of its input (FedLEASE's top-M router) is refused, as is one whose affine part adds a bias
its base layer has no room for. The merged weight is rounded once, to the base weight's dtype. Imports torch and
PEFT only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

AFFINE_TOL = 1e-9  # relative: the probe is float64, so a fixed affine map reproduces itself to ~1e-15


class NotMergeable(ValueError):
    """A layer whose output is not a fixed affine map of its input: no plain weight holds it."""


PROBE_BLOCK = 1024  # identity columns per forward: bounds the probe's memory on wide layers


def is_plain_peft(layer: nn.Module) -> bool:
    """Whether ``layer`` is exactly as PEFT built it: PEFT's (and torch's, transformers') classes only, one adapter,
    no hook, nothing merged yet. Then PEFT's own ``merge`` is its merged weight."""
    adapters = {k for name in getattr(layer, "adapter_layer_names", ()) for k in getattr(layer, name, {}).keys()}
    return (len(adapters) == 1 and not getattr(layer, "merged_adapters", None) and "forward" not in vars(layer)
            and all(type(m).__module__.split(".")[0] in ("torch", "peft", "transformers") for m in layer.modules())
            and not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()))


@torch.no_grad()
def effective_linear(layer: nn.Module, name: str = "") -> tuple[Tensor, Tensor]:
    """``(W, b)`` of an adapted linear layer in float64: ``W`` d×k (out×in, whatever the base layer's layout), ``b``
    of length d; raises :class:`NotMergeable` when a random input shows the layer is not ``x ↦ Wx + b``."""
    probe = copy.deepcopy(layer).to(torch.float64).eval()
    if is_plain_peft(layer):
        probe.merge()
        base = probe.get_base_layer()
        W = base.weight.T if bool(getattr(layer, "fan_in_fan_out", False)) else base.weight
        bias = base.bias if getattr(base, "bias", None) is not None else torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
        return W.detach().contiguous(), bias.detach()
    k = int(layer.in_features)
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    zero = probe(torch.zeros(1, k, dtype=torch.float64, device=device))[0]
    eye = torch.eye(k, dtype=torch.float64, device=device)
    W = torch.cat([(probe(eye[i:i + PROBE_BLOCK]) - zero).T for i in range(0, k, PROBE_BLOCK)], dim=1).contiguous()
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
