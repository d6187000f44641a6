"""The adapter kind objects (fedlora.adapters.kinds), each on a small PEFT model of nn.Linear and transposed Conv1D
layers: factors read → written → read back unchanged (and a coefficient combination reads back as that combination),
fresh initialisation adds nothing to the (folded) base, a fold plus a fresh init keeps the layer's function."""

import math

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.adapters import ADAPTERS, EXAMPLE_DP_ADAPTERS, MIXED_RANK_ADAPTERS, AdapterHandle, AdapterSpec
from fedlora.aggregation import Aggregate

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = list(ADAPTERS)
R = 4
D, K = 10, 12  # non-square: a factor or update in the wrong orientation does not fit


class Tiny(nn.Module):
    """Two adapted layers d×k: ``query`` and ``value`` as nn.Linear, or as transformers' Conv1D (weight stored k×d)."""

    def __init__(self, transposed: bool):
        super().__init__()
        make = (lambda: Conv1D(D, K)) if transposed else (lambda: nn.Linear(K, D))
        self.query, self.value = make(), make()
        self.value.weight.data.normal_(0.0, 0.3)  # Conv1D starts at N(0, 0.02²): give the norms some spread

    def forward(self, x):
        return self.query(x) + self.value(x)


def handle(kind: str, transposed: bool = False, *, seed: int = 0) -> AdapterHandle:
    torch.manual_seed(seed)
    model = Tiny(transposed)
    spec = AdapterSpec(kind=kind, r=R, alpha=8.0).for_model(model)
    assert spec.fan_in_fan_out == transposed
    return AdapterHandle(peft.get_peft_model(model, spec.peft_config(None)), spec)


def trained(h: AdapterHandle, seed: int) -> dict[str, torch.Tensor]:
    """Every trainable at random values (an adapter after some training)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5 + (1.0 if "magnitude" in n else 0.0)
            for n, t in h.get().items()}


def factor_names(h: AdapterHandle) -> list[str]:
    return h.B_names() + h.A_names()


@torch.no_grad()
def outputs(h: AdapterHandle, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted layer: (the adapted layer's output, its base layer's output) on ``x``."""
    return {m: (layer(x), layer.get_base_layer()(x)) for m, layer in h.layers.items()}


def test_each_kind_is_one_object_and_the_spec_holds_it():
    assert KINDS == ["lora", "rslora", "dora", "vera", "hira"]
    configs = {"lora": (peft.LoraConfig, False, False), "rslora": (peft.LoraConfig, True, False),
               "dora": (peft.LoraConfig, False, True), "vera": (peft.VeraConfig, None, None), "hira": (peft.HiraConfig, None, None)}
    for kind in KINDS:
        spec = AdapterSpec(kind=kind, r=4, alpha=8.0)
        assert spec.variant is ADAPTERS[kind] and spec.variant.name == kind
        cls, rs, dora = configs[kind]
        config = spec.peft_config(None)
        assert type(config) is cls
        if cls is peft.LoraConfig:
            assert (config.use_rslora, config.use_dora, config.lora_alpha) == (rs, dora, 8.0)
    scales = {k: AdapterSpec(kind=k, r=4, alpha=8.0).scale_at(2) for k in KINDS}
    assert scales == {"lora": 4.0, "rslora": pytest.approx(8 / math.sqrt(2)), "dora": 4.0, "vera": 1.0, "hira": 1.0}
    assert MIXED_RANK_ADAPTERS == ("lora", "rslora", "dora", "hira")  # VeRA's rank is its shared projections'
    assert EXAMPLE_DP_ADAPTERS == ("lora", "rslora")  # Opacus: DoRA crashes, VeRA and HiRA get no gradients
    assert [k for k in KINDS if ADAPTERS[k].exports_as_lora] == ["lora", "rslora"]
    with pytest.raises(ValueError, match="unknown adapter 'lora2'; choose one of lora, rslora, dora, vera, hira"):
        AdapterSpec(kind="lora2")


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_factors_round_trip(kind, transposed):
    """read → write → read: the written trainables are the originals, and read back as the same factors d×r, r×k.
    A rule's coefficients (p, q over two clients) are written so that they read back as that combination of factors."""
    h = handle(kind, transposed)
    one, two = trained(h, 1), trained(h, 2)
    (B1, A1), (B2, A2) = h.factors(one), h.factors(two)
    assert all(B1[m].shape == (D, R) and A1[m].shape == (R, K) for m in h.layers)
    pick = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = {}
    h.write_factors({m: Aggregate("x", B=B2[m], A=A2[m], p=pick, q=pick) for m in h.layers}, [one, two], out)
    assert sorted(out) == sorted(factor_names(h))
    assert all(torch.equal(out[n], two[n]) for n in out)
    Bw, Aw = h.factors(out)
    assert all(torch.equal(Bw[m], B2[m]) and torch.equal(Aw[m], A2[m]) for m in h.layers)

    p, q = torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([0.6, 0.4], dtype=torch.float64)
    mix = {m: Aggregate("x", B=0.25 * B1[m] + 0.75 * B2[m], A=0.6 * A1[m] + 0.4 * A2[m], p=p, q=q) for m in h.layers}
    out = {}
    h.write_factors(mix, [one, two], out, A=False)  # FedSA-style: only B written
    assert sorted(out) == sorted(h.B_names())
    Bw, _ = h.factors(out)
    for m in h.layers:
        torch.testing.assert_close(Bw[m], mix[m].B, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", [k for k in KINDS if ADAPTERS[k].mixed_ranks])
def test_lower_rank_factors_round_trip_through_the_full_rank_model(kind):
    h = handle(kind)
    h.set(trained(h, 3))
    low = h.get(rank=2)
    assert all(low[n].shape[h.rank_dim[n]] == 2 for n in factor_names(h))
    B, A = h.factors(low)
    out = {}
    h.write_factors({m: Aggregate("x", B=B[m], A=A[m]) for m in h.layers}, [low], out)
    for n in factor_names(h):
        dim = h.rank_dim[n]
        assert out[n].shape == h.parameter(n).shape
        assert torch.equal(out[n].narrow(dim, 0, 2), low[n]) and not out[n].narrow(dim, 2, R - 2).any()
    assert all(torch.equal(t, low[n]) for n, t in h.truncate(out, 2).items() if n in low)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_init_adds_nothing_to_the_folded_base(kind, transposed):
    """PEFT's init: B zero (VeRA λ_b = 0, λ_d = d_initial), A seeded Kaiming-uniform; DoRA's magnitude re-derived
    from the base as it is now (after a fold), so every adapted layer computes its base layer alone."""
    h = handle(kind, transposed)
    h.set(trained(h, 4))
    gen = torch.Generator().manual_seed(5)
    h.fold({m: torch.randn(D, K, generator=gen) for m in h.layers})
    fresh = h.fresh_factors(seed=7)
    assert all(torch.equal(fresh[n], t) for n, t in h.fresh_factors(seed=7).items())
    assert all(not fresh[n].any() for n in h.B_names())
    if ADAPTERS[kind].factor_form == "vector":
        assert all(torch.equal(fresh[n], torch.full((R,), peft.VeraConfig().d_initial)) for n in h.A_names())
    else:
        other = h.fresh_factors(seed=8)
        for n in h.A_names():
            assert fresh[n].abs().max() <= 1 / math.sqrt(K) and fresh[n].std() > 0.1 / math.sqrt(K)
            assert not torch.equal(fresh[n], other[n])
    h.set(fresh)
    x = torch.randn(3, K, generator=gen)
    for m, (y, base) in outputs(h, x).items():
        torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-5, msg=f"{kind}: fresh {m} is not its base layer")


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_fold_then_fresh_init_keeps_the_function(kind, transposed):
    """Folding each layer's own update into its base and re-initialising (FLoRA, FRLoRA) keeps what it computes:
    W0 + s·BA for LoRA/rsLoRA/VeRA (VeRA: s = 1, B_u A_u = diag(λ_b)B·diag(λ_d)A), W0 ⊙ (1 + BA) for HiRA. DoRA
    renormalises W0 + s·BA with its magnitude, so only the additive step is checked: W0 += s·Δ."""
    h = handle(kind, transposed)
    h.set(trained(h, 6))
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(9))
    before = outputs(h, x)
    weights = {m: h.base_layout(m, layer.get_base_layer().weight).detach().clone() for m, layer in h.layers.items()}
    B, A = h.factors(h.get())
    h.fold({m: B[m] @ A[m] for m in h.layers})
    for m, layer in h.layers.items():
        W0, W1 = weights[m].double(), h.base_layout(m, layer.get_base_layer().weight).double()
        delta = (B[m] @ A[m]).double()
        want = W0 + W0 * delta if kind == "hira" else W0 + h.scaling(m) * delta
        torch.testing.assert_close(W1, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.base_layout(m, h.folded[m]).double(), W1 - W0, rtol=1e-6, atol=1e-6)
    if kind == "dora":
        return
    h.set(h.fresh_factors(seed=10))
    for m, (y, _) in outputs(h, x).items():
        torch.testing.assert_close(y, before[m][0], rtol=1e-5, atol=1e-5, msg=f"{kind}: fold + fresh changed {m}")


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_fedex_with_hira_is_exact_on_random_factors(transposed):
    """FedEx-LoRA with HiRA: after the fold of the residual R = ΔW* − B̂Â and taking B̂, Â, every layer's weight is
    W0 ⊙ (1 + Σ w_u B_u A_u) (HiRA's FedAvg of the clients' models), exactly; the plain fold W0 ⊙ R would leave
    the cross term W0 ⊙ R ⊙ B̂Â, over 100 times the tolerance on these factors."""
    from fedlora.federation import methods  # noqa: F401  (registers fedex)
    from fedlora.federation.protocol import Peer, RoundContext, fold_deltas, make_method

    h = handle("hira", transposed)
    start = h.get()
    uploads = [trained(h, 20 + u) for u in range(3)]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    W0 = {m: h.base_layout(m, layer.get_base_layer().weight).detach().double().clone() for m, layer in h.layers.items()}
    method = make_method("fedex", "hira")
    ctx = RoundContext(number=1, seed=3, peers=[Peer(u, R, 1.0) for u in range(3)])
    update = method.aggregate(h, uploads, w, start, ctx)
    new = method.apply(h, update.broadcast, start, Peer(-1, R, 1.0), seed=3)
    B, A = h.factors(new)
    Bu = [h.factors(u) for u in uploads]
    deltas = fold_deltas(update.broadcast)
    for m, layer in h.layers.items():
        ideal = W0[m] * (1 + sum(float(c) * b[0][m].double() @ b[1][m].double() for c, b in zip(w, Bu)))
        base = h.base_layout(m, layer.get_base_layer().weight).detach().double()
        kept = B[m].double() @ A[m].double()
        torch.testing.assert_close(base * (1 + kept), ideal, rtol=0, atol=1e-5)
        plain = (W0[m] * (1 + deltas[m].double())) * (1 + kept)  # the fold without the correction
        assert float((plain - ideal).abs().max()) > 100 * 1e-5
