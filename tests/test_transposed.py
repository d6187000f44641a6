"""Layers that store their weight transposed (in×out: transformers' ``Conv1D`` in GPT-2-style models, PEFT's
``fan_in_fan_out``). Every update in fedlora is d×k (out×in, B A); the folds of fedex and flora, HiRA's W0 ⊙ Δ,
DoRA's re-derived magnitude and Fed-SB's gradient init must all be turned into the weight's own layout.

``tiny:gpt2``: c_attn is 32→96 (non-square: a transposed update does not fit), attn.c_proj 32→32 (square: a
transposed update would fit and be silently wrong)."""

import pytest
import torch

from conftest import tiny_config
from fedlora.app.experiment import build

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
ATOL = 1e-7  # the errors are a few 1e-9 (float32 base weights of ~0.1)


def gpt2_config(small_csv, **overrides):
    return tiny_config(small_csv, **({"model": "tiny:gpt2", "target_modules": "c_attn"} | overrides))


def dense(h, module):
    """``module``'s base weight as d×k (out×in), float64."""
    return h.base_layout(module, h.layers[module].get_base_layer().weight.detach()).to(F64)


def effective(h, module, W0, tensors):
    """The effective d×k weight of base ``W0`` (d×k) with the factors in ``tensors``: W0 + s·B A (HiRA: W0 ⊙ (1 + B A))."""
    k = h.keys[module]
    BA = tensors[k.B].to(F64) @ tensors[k.A].to(F64)
    return W0 * (1 + BA) if h.spec.kind == "hira" else W0 + h.scaling(module) * BA


def run_recording(sim):
    """Run the simulator; per round, the d×k base weights and global factors the clients started from, their
    uploads and their weights."""
    h, rounds = sim.handle, []
    original = sim.method.aggregate

    def spy(h_, uploads, weights, current, ctx):
        rounds.append({"base": {m: dense(h, m).clone() for m in h.layers}, "current": dict(current), "uploads": uploads,
                       "weights": weights})
        return original(h_, uploads, weights, current, ctx)

    sim.method.aggregate = spy
    try:
        history = sim.run()
    finally:
        del sim.method.aggregate
    return rounds, history


def ideal(h, module, rec):
    """The FedAvg of the clients' full models, W0 + s·Σ w_u B_u A_u (HiRA: W0 ⊙ (1 + Σ w_u B_u A_u)), d×k."""
    k = h.keys[module]
    mean = sum(float(w) * u[k.B].to(F64) @ u[k.A].to(F64) for w, u in zip(rec["weights"], rec["uploads"]))
    W0 = rec["base"][module]
    return W0 * (1 + mean) if h.spec.kind == "hira" else W0 + h.scaling(module) * mean


def assert_forward(sim, module, W):
    """The adapted layer computes x ↦ x Wᵀ + b with the global adapter loaded (W: the effective d×k weight)."""
    h = sim.handle
    h.set(sim.global_tensors)
    layer = h.layers[module]
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(5))
    was = h.model.training
    h.model.eval()
    with torch.no_grad():
        got = layer(x).to(F64)
    h.model.train(was)
    want = x.to(F64) @ W.T + layer.get_base_layer().bias.detach().to(F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tiny_gpt2_targets_are_conv1d_with_factors_out_by_r_and_r_by_in(small_csv):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")  # the spec sets it: PEFT need not
        exp = build(gpt2_config(small_csv, target_modules="c_attn,attn.c_proj"))
    h = exp.simulator.handle
    assert h.spec.fan_in_fan_out and exp.simulator.model.peft_config["default"].fan_in_fan_out
    assert len(h.layers) == 4 and all(h.transposed.values())
    for module, k in h.keys.items():
        layer = h.layers[module]
        d, kk = layer.out_features, layer.in_features
        assert (d, kk) == ((96, 32) if module.endswith("c_attn") else (32, 32))
        assert tuple(layer.get_base_layer().weight.shape) == (kk, d)  # stored in×out
        assert tuple(h.parameter(k.B).shape) == (d, 4) and tuple(h.parameter(k.A).shape) == (4, kk)


# fedex + HiRA folds its residual as W0 ⊙ R ⊘ (1 + B̂Â), beside the B̂Â it keeps; flora + HiRA re-initialises B = 0,
# so its fold W0 += W0 ⊙ Σ w_u B_u A_u checks HiRA's plain elementwise fold.
@pytest.mark.parametrize("target", ["c_attn", "attn.c_proj"])
@pytest.mark.parametrize("method,adapter", [("fedex", "lora"), ("fedex", "hira"), ("flora", "lora"), ("flora", "hira")])
def test_fold_into_conv1d_gives_the_exact_fedavg_of_the_clients(small_csv, method, adapter, target):
    sim = build(gpt2_config(small_csv, method=method, adapter=adapter, target_modules=target)).simulator
    h = sim.handle
    assert all(h.transposed.values()) and len(h.layers) == 2
    initial = {m: dense(h, m).clone() for m in h.layers}
    rounds, history = run_recording(sim)
    assert len(rounds) == 2 and all(m["n_rejected"] == 0 for m in history)
    for module, k in h.keys.items():
        # After the last round the global model is the FedAvg of that round's client models, on the base they
        # trained on; and every round's base is the previous round's FedAvg (the fold carried it over exactly).
        for rec, nxt in zip(rounds, rounds[1:]):
            start = effective(h, module, nxt["base"][module], nxt["current"])
            torch.testing.assert_close(start, ideal(h, module, rec), rtol=0, atol=ATOL)
        W = effective(h, module, dense(h, module), sim.global_tensors)
        want = ideal(h, module, rounds[-1])
        torch.testing.assert_close(W, want, rtol=0, atol=ATOL)
        # The test can fail: the update is far above the tolerance and, on the square layer, far from its transpose.
        update = want - initial[module]
        assert float(update.abs().max()) > 100 * ATOL
        if update.shape[0] == update.shape[1]:
            assert float((update - update.T).abs().max()) > 100 * ATOL
        if method == "flora":  # re-initialised: everything is in the base, as the folds added it
            assert torch.count_nonzero(sim.global_tensors[k.B]) == 0
        # ``folded`` is what was added to the stored weight, in its layout (in×out).
        stored = h.layers[module].get_base_layer().weight.detach().to(F64)
        torch.testing.assert_close(h.folded[module].to(F64), stored - h.base_layout(module, initial[module]), rtol=0, atol=ATOL)
        assert_forward(sim, module, W)


def test_dora_reinit_magnitude_is_the_row_norm_of_the_stored_transposed_weight(small_csv):
    """FLoRA + DoRA re-derives the magnitude from the folded base: PEFT's ‖W0‖ over each output row (d of them),
    so with B = 0 the layer is its base layer again."""
    sim = build(gpt2_config(small_csv, method="flora", adapter="dora", target_modules="c_attn,attn.c_proj", rounds=1)).simulator
    h = sim.handle
    sim.run()
    h.set(sim.global_tensors)
    h.model.eval()
    for module, layer in h.layers.items():
        assert torch.count_nonzero(sim.global_tensors[h.keys[module].B]) == 0
        x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=0, atol=1e-5)


def test_fedsb_gradient_init_is_the_out_by_in_gradient(small_csv):
    """Fed-SB's round 0 uploads dL/dW0 as d×k: s·Bᵀ G Aᵀ is then the gradient of the (zero) cores, and the bases
    built from it fit the non-square c_attn."""
    from fedlora.federation.methods.fedsb import SETUP_EXAMPLES

    sim = build(gpt2_config(small_csv, method="fedsb", target_modules="c_attn,attn.c_proj", rounds=1)).simulator
    h, method, cfg = sim.handle, sim.method, sim.config
    client = sim.clients[0]
    h.set(sim.global_tensors)
    upload = method.setup_upload(h, sim.task, client.train, cfg)
    cores = {m: h.parameter(k.core) for m, k in h.keys.items()}
    want = {m: torch.zeros_like(c, dtype=F64) for m, c in cores.items()}
    n = min(len(client.train), SETUP_EXAMPLES)
    h.model.eval()
    for start in range(0, n, cfg.batch_size):
        index = torch.arange(start, min(start + cfg.batch_size, n))
        loss = sim.task.loss(h.model, client.train.batch(index, cfg.device)) * (len(index) / n)
        for m, g in zip(cores, torch.autograd.grad(loss, list(cores.values()))):
            want[m] += g.to(F64)
    h.model.train()
    for module, k in h.keys.items():
        layer = h.layers[module]
        G = upload[f"{module}.grad"].to(F64)
        assert tuple(G.shape) == (layer.out_features, layer.in_features)
        B, A = h.parameter(k.B).detach().to(F64), h.parameter(k.A).detach().to(F64)
        got = h.scaling(module) * B.T @ G @ A.T
        scale = float(want[module].abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want[module][0], rtol=0, atol=1e-4 * scale)
    history = sim.run()  # the bases from the mean gradient fit every layer, square or not
    assert history[0]["divergence"] < 1e-5


@pytest.mark.parametrize("method,adapter", [("fedex", "lora"), ("flora", "hira")])
def test_exported_global_model_reloads_on_a_fresh_gpt2(small_csv, tmp_path, method, adapter):
    """fedex + LoRA: the folds go inside the exported LoRA (d×k, whatever the base layout); flora + HiRA: into
    base_delta.safetensors, in the stored layout, added to the fresh base as it is. Either way the reloaded model
    is the global model."""
    from fedlora.app.experiment import run_experiment
    from fedlora.app.export import load_global_model

    out = tmp_path / "run"
    exp, _ = run_experiment(gpt2_config(small_csv, method=method, adapter=adapter, target_modules="c_attn,attn.c_proj",
                                        rounds=1, out=str(out)))
    sim = exp.simulator
    assert all(tuple(t.shape) == tuple(sim.handle.layers[m].get_base_layer().weight.shape) for m, t in sim.handle.folded.items())
    model, _, _ = load_global_model(out)
    batch = sim.global_test.batch(torch.arange(len(sim.global_test)))
    sim.handle.set(sim.global_state())
    sim.model.eval()
    model.eval()
    with torch.no_grad():
        want, got = sim.model(**batch).logits, model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
