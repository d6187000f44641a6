"""Merging adapted layers into plain weights (fedlora.adapters.merge): for every adapter kind, on nn.Linear and on
transposed Conv1D layers with random trained factors, both merge paths (PEFT's merge, the layer's own forward) equal
the adapted layer's function and PEFT's own merge_and_unload; a layer that is not a fixed linear map is refused."""

import copy

import peft
import pytest
import torch
from torch import nn

from fedlora.adapters import ADAPTERS
from fedlora.adapters.merge import NotMergeable, effective_linear, merge_into_base
from test_adapter_kinds import handle, trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
@pytest.mark.parametrize("path", ["peft", "forward"])
def test_merged_model_equals_the_adapted_one_and_peft_merge(kind, transposed, path, monkeypatch):
    import fedlora.adapters.merge as merge

    assert merge.is_plain_peft(handle(kind, transposed).layers["query"])
    if path == "forward":  # as for a structure PEFT does not know
        monkeypatch.setattr(merge, "is_plain_peft", lambda layer: False)
    h = handle(kind, transposed, seed=1)
    h.set(trained(h, seed=2))
    x = torch.randn(5, 12)
    with torch.no_grad():
        want = h.model(x)
        peft_merged = copy.deepcopy(h.model).merge_and_unload()
        ours = merge_into_base(copy.deepcopy(h.model))
        assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in ours.modules())
        torch.testing.assert_close(ours(x), want, rtol=1e-6, atol=1e-6)
        for name in ("query", "value"):  # the same weights as PEFT's merge, where PEFT has one
            torch.testing.assert_close(getattr(ours, name).weight, getattr(peft_merged, name).weight, rtol=1e-5, atol=1e-6)


def test_a_layer_that_is_not_affine_is_refused():
    class Routed(nn.Module):  # an input-dependent mix, as a router makes
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 3)
            self.in_features = 4

        def forward(self, x):
            return self.base(x) * torch.sigmoid(x.sum(-1, keepdim=True))

    with pytest.raises(NotMergeable, match="not a fixed linear map"):
        effective_linear(Routed(), "routed")


def test_effective_weight_of_a_plain_layer_is_its_weight():
    layer = nn.Linear(6, 3)
    W, b = effective_linear(layer)
    torch.testing.assert_close(W, layer.weight.double(), rtol=0, atol=1e-15)
    torch.testing.assert_close(b, layer.bias.double(), rtol=0, atol=1e-15)
