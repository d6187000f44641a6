"""FedDPA (METHODS.md): a global adapter run exactly as FedIT, a local adapter that never leaves the client, and
local scores from the per-instance mix of the two."""


import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.adapters.structures import LOCAL
from fedlora.app.experiment import build, run_experiment
from fedlora.federation import make_method

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")


def spy_on(sim):
    seen = []
    inner = sim.method.aggregate

    def spy(h, uploads, weights, current, ctx):
        update = inner(h, uploads, weights, current, ctx)
        seen.append((uploads, update))
        return update

    sim.method.aggregate = spy
    return seen


def test_the_global_path_is_fedit_and_the_local_adapter_never_leaves(small_csv):
    fedit = build(tiny_config(small_csv, method="fedit", rounds=3, fraction=0.67)).simulator.run()
    sim = build(tiny_config(small_csv, method="feddpa", rounds=3, fraction=0.67)).simulator
    seen = spy_on(sim)
    history = sim.run()
    for a, b in zip(history, fedit):  # same seeds: the global adapter trains, travels and averages as FedIT's
        for key in ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "train_loss"):
            assert a[key] == b[key], (a["round"], key)
    h = sim.handle
    local = [n for n in h.trainable_names if f".{LOCAL}." in n]
    assert local and all(n.replace(f".{LOCAL}.", ".default.") in h.trainable_set for n in local)
    for uploads, update in seen:
        assert not any(f".{LOCAL}." in n for u in uploads for n in u)
        assert not any(f".{LOCAL}." in n for n in update.broadcast)
    # Each client keeps its own trained local adapter: different across clients, moved from the shared init.
    kept = [sim.private[c] for c in sorted(sim.private)]
    assert len(kept) == 3 and set(kept[0]) == set(local)
    B = next(n for n in local if ".lora_B." in n)
    assert float(kept[0][B].abs().max()) > 0 and not torch.equal(kept[0][B], kept[1][B])
    # A client's own model (its scores: local accuracy) is the mix, not the global adapter alone.
    h.set(sim.held[0] | sim.private[0])
    batch = sim.clients[0].test.batch(torch.arange(6))
    batch.pop("labels")
    with torch.no_grad():
        alone = h.model(**batch).logits
        with sim.method.local_scoring(h, sim.clients[0].train, "cpu"):
            mixed = h.model(**batch).logits
    assert float((mixed - alone).abs().max()) > 1e-6
    h.set(sim.global_tensors)


def test_the_mix_is_per_instance_on_the_outputs(small_csv):
    sim = build(tiny_config(small_csv, method="feddpa")).simulator
    h, method = sim.handle, sim.method
    module = next(iter(h.layers))
    layer = h.layers[module]
    g = torch.Generator().manual_seed(0)
    for name, p in h.model.named_parameters():
        if name.startswith(f"base_model.model.{module}.lora_"):
            p.data = torch.randn(p.shape, generator=g) * 0.3
    x = torch.randn(3, 5, 32, generator=g)
    with torch.no_grad():
        def path(adapter):
            return layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.scaling[adapter]

        W0x, glob, loc = layer.get_base_layer()(x), path("default"), path(LOCAL)
        torch.testing.assert_close(layer(x), W0x + glob)  # off: the global model
        alpha = torch.tensor([0.0, 0.3, 1.0])
        with method.mix.mixed(alpha):
            torch.testing.assert_close(layer(x), W0x + (1 - alpha)[:, None, None] * glob + alpha[:, None, None] * loc)
        with method.mix.mixed(0.5):
            torch.testing.assert_close(layer(x), W0x + 0.5 * glob + 0.5 * loc)
    assert method.mix.alpha == 0.0


def test_alpha_comes_from_real_tokens_and_is_set_while_scoring_locally(small_csv):
    sim = build(tiny_config(small_csv, method="feddpa")).simulator
    h, method, client = sim.handle, sim.method, sim.clients[0]
    batch = client.test.batch(torch.arange(4))
    width = batch["input_ids"].shape[1]
    padded = {k: torch.nn.functional.pad(batch[k], (0, 7)) for k in ("input_ids", "attention_mask")}  # 7 more padding tokens
    reps = method.represent(h, batch)
    torch.testing.assert_close(method.represent(h, padded), reps, rtol=1e-5, atol=1e-5)
    assert padded["input_ids"].shape[1] == width + 7
    seen = []
    hook = h.layers[next(iter(h.layers))].register_forward_hook(lambda mod, *a: None if mod.disable_adapters else seen.append(method.mix.alpha))
    with method.local_scoring(h, client.train, "cpu"):
        h.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    alpha = seen[0]
    assert isinstance(alpha, torch.Tensor) and alpha.shape == (4,) and bool(((alpha >= 0) & (alpha <= 1)).all())
    assert alpha.std() > 0  # per instance, not one number
    assert seen[-1] == 0.0  # outside local scoring the model is the global one


def test_resume_and_reload(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="feddpa", rounds=2, fraction=0.67)
    reference = build(cfg).simulator.run()
    def same_clients(first, resumed):
        assert set(resumed.private) == set(first.private)

    resume_matches(cfg, tmp_path, KEYS, reference, restored=same_clients)

    from fedlora.app.export import load_global_model

    exp, _ = run_experiment(cfg.replace(out=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "adapter" / LOCAL).exists()  # the global adapter only
    assert sorted(p.name for p in (tmp_path / "run" / "private").iterdir()) == [f"client_{c}.safetensors" for c in sorted(exp.simulator.private)]
    model, _, _ = load_global_model(tmp_path / "run")
    sim = exp.simulator
    sim.handle.set(sim.global_state())
    batch = sim.global_test.batch(torch.arange(8))
    batch.pop("labels")
    model.eval(), sim.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, sim.model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_adapters_and_options_are_one_line():
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"does not support adapter {adapter}"):
            make_method("feddpa", adapter)
    with pytest.raises(ValueError, match="feddpa-train-alpha=1.5"):
        make_method("feddpa", "lora", train_alpha=1.5)
