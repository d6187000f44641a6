"""Client-level differential privacy (DP-FedAvg) and its accountant."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from fedlora.app.experiment import build
from fedlora.cli.main import main
from fedlora.federation.privacy import PrivacyConfig, epsilon_spent, l2, noise_for_epsilon, privatise, sample_poisson, update_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_epsilon_is_opacus_accountant_called_directly_and_close_to_an_independent_rdp_bound():
    from opacus.accountants import PRVAccountant, RDPAccountant

    for z, q, T in ((1.0, 0.1, 10), (0.8, 0.5, 30), (2.0, 1.0, 5)):
        acc = RDPAccountant()
        for _ in range(T):
            acc.step(noise_multiplier=z, sample_rate=q)
        assert epsilon_spent(z, q, T, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
        prv = PRVAccountant()
        for _ in range(T):
            prv.step(noise_multiplier=z, sample_rate=q)
        assert epsilon_spent(z, q, T, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    # Independent check without subsampling (q = 1): the Gaussian mechanism's RDP is α/(2z²) per step, and the
    # classic conversion ε = min_α Tα/(2z²) + log(1/δ)/(α−1) is an upper bound Opacus's tighter conversion may beat
    # by at most a modest factor.
    z, T, delta = 2.0, 5, 1e-5
    classic = min(T * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in [1 + x / 100 for x in range(1, 10000)])
    eps = epsilon_spent(z, 1.0, T, delta)
    assert 0.6 * classic <= eps <= classic


def test_target_epsilon_picks_the_noise_that_spends_it():
    z = noise_for_epsilon(4.0, 1e-5, 0.2, 20)
    assert epsilon_spent(z, 0.2, 20, 1e-5) == pytest.approx(4.0, rel=2e-2)
    assert epsilon_spent(z, 0.2, 20, 1e-5) <= 4.0 + 1e-2
    assert epsilon_spent(0.0, 0.2, 3, 1e-5) == math.inf and epsilon_spent(1.0, 0.2, 0, 1e-5) == 0.0


def test_clipping_bounds_a_clients_contribution_exactly():
    start = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}
    big = {"a": torch.full((4, 3), 10.0), "b": torch.full((5,), 10.0)}  # norm ≈ 41.2
    small = {"a": torch.full((4, 3), 0.01), "b": torch.zeros(5)}
    cfg = PrivacyConfig(mode="client", clip=0.4123, noise=0.0)
    assert l2(update_of(big, start)) > 100 * cfg.clip
    out, diag = privatise([big, small], [start, start], cfg, expected=2.0, seed=0)
    assert l2(update_of(out[0], start)) == pytest.approx(cfg.clip, rel=1e-6)
    assert torch.equal(out[1]["a"], small["a"])  # under the clip and n = m: untouched
    assert diag["clipped"] == 1 and diag["noise_std"] == 0.0


def test_the_noise_has_the_stated_standard_deviation_on_the_average():
    start = {"x": torch.zeros(200, 50, dtype=torch.float64)}
    cfg = PrivacyConfig(mode="client", clip=2.0, noise=1.5)
    n, m = 3, 4.0  # three sampled, four expected
    out, diag = privatise([dict(start) for _ in range(n)], [start] * n, cfg, expected=m, seed=7)
    mean = sum(o["x"] for o in out) / n  # what a uniform-weighted linear rule computes
    assert diag["noise_std"] == pytest.approx(1.5 * 2.0 / m)
    assert float(mean.std()) == pytest.approx(diag["noise_std"], rel=0.03)  # 10,000 draws
    assert abs(float(mean.mean())) < 3 * diag["noise_std"] / 100
    again, _ = privatise([dict(start) for _ in range(n)], [start] * n, cfg, expected=m, seed=7)
    assert torch.equal(again[0]["x"], out[0]["x"])  # seeded: reproducible


def test_poisson_sampling_includes_each_client_at_the_rate():
    counts = torch.zeros(50)
    for s in range(400):
        for i in sample_poisson(50, 0.3, s):
            counts[i] += 1
    assert float(counts.mean()) / 400 == pytest.approx(0.3, abs=0.02)
    assert sample_poisson(10, 1.0, 0) == list(range(10))


def test_no_noise_and_no_clip_is_exactly_the_uniform_weighted_run(small_csv):
    plain = build(tiny_config(small_csv, method="fedit", weighting="uniform", max_norm_ratio=0.0)).simulator.run()
    dp = build(tiny_config(small_csv, method="fedit", dp="client", dp_clip=math.inf, dp_noise=0.0)).simulator.run()
    for a, b in zip(plain, dp):
        assert a["global_accuracy"] == b["global_accuracy"] and a["divergence"] == b["divergence"] and a["train_loss"] == b["train_loss"]
    assert dp[-1]["epsilon"] is None and dp[-1]["delta"] == 1e-5  # no noise: no finite ε, recorded as null


def test_a_dp_run_records_epsilon_each_round(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "6", "--rounds", "3", "--local-steps", "1",
            "--examples-per-client", "20", "--test-examples", "30", "--max-length", "24", "--rank", "2", "--method", "ffa",
            "--dp", "client", "--dp-clip", "0.5", "--dp-noise", "1.1", "--fraction", "0.5", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon_spent(1.1, 0.5, 3, 1e-5), rel=1e-9)
    assert "ε" in capsys.readouterr().out
    assert "ε" in (out / "summary.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "florana"], "needs a method whose server rule is a weighted sum"),
    (["--dp-clip", "0"], "--dp-clip 0.0 must be positive"),
    (["--dp-noise", "-1"], "--dp-noise -1.0 must be a finite number"),
    (["--dp-delta", "1"], "--dp-delta 1.0 is outside (0, 1)"),
    (["--dp", "global"], "unknown --dp 'global'"),
])
def test_bad_dp_settings_are_one_line_errors(small_csv, capsys, extra, message):
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--method", "fedit", "--dp", "client", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error:") and "\n" not in err and message in err, err


def test_client_dp_on_flower_equals_the_simulator(small_csv, tmp_path):
    """The DP step lives in the server half of the round that both engines share; Poisson sampling too."""

    pytest.importorskip("flwr")
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="fedit", dp="client", dp_clip=0.5, dp_noise=0.8, fraction=0.67, rounds=3)
    reference = build(cfg).simulator.run()
    history = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    assert [h["epsilon"] for h in history] == [h["epsilon"] for h in reference]
    assert [h["dp_clipped"] for h in history] == [h["dp_clipped"] for h in reference]


# ---- example-level DP ---------------------------------------------------------------------------------------------


def test_opacus_per_example_gradients_of_lora_equal_torch_func(small_csv):
    from opacus import GradSampleModule
    from torch.func import functional_call, grad

    exp = build(tiny_config(small_csv, method="fedit"))
    model = exp.simulator.model
    model.train()  # Opacus records activations only in training mode; no dropout, so both sides see one function
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = exp.simulator.clients[0].train.batch(torch.arange(5))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    gs = GradSampleModule(model, loss_reduction="mean")
    try:
        gs(**batch).loss.backward()
        opacus = {n: p.grad_sample.clone() for n, p in trainable.items()}
    finally:
        gs._close()
        model.zero_grad(set_to_none=True)

    def loss_one(params, i):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        return functional_call(model, params, args=(), kwargs=one).loss

    params = {n: p.detach() for n, p in trainable.items()}
    for i in range(5):
        ref = grad(loss_one)(params, i)
        for n in trainable:
            assert torch.allclose(opacus[n][i], ref[n], rtol=1e-4, atol=1e-6), (n, i)


def test_example_level_dp_trains_and_accounts_each_client(small_csv, tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = tiny_config(small_csv, method="fedit", dp="example", dp_clip=1.0, dp_noise=1.2, rounds=2, fraction=0.67)
    sim = build(cfg).simulator
    history = sim.run()
    assert history[-1]["global_accuracy"] == history[-1]["global_accuracy"]  # trained to the end, not NaN
    per = history[-1]["epsilon_per_client"]
    assert history[-1]["epsilon"] == max(per.values()) and history[0]["epsilon"] <= history[-1]["epsilon"]
    cid = max(per, key=per.get)
    joined = sum(cid in h["clients"] for h in history)
    acc = RDPAccountant()
    rate = min(1.0, cfg.batch_size / len(sim.clients[cid].train))
    for _ in range(joined * cfg.local_steps):
        acc.step(noise_multiplier=1.2, sample_rate=rate)
    assert per[cid] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # The uploads differ from the non-private run's: noise went into every step.
    plain = build(tiny_config(small_csv, method="fedit", rounds=2, fraction=0.67)).simulator.run()
    assert plain[0]["divergence"] != history[0]["divergence"]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_client_ledger_of_many_rounds_is_the_accountant_over_all_its_steps(accountant):
    """A client's ledger gets one (z, q, steps) entry per round it trains; its ε is the accountant's over every step,
    however the entries interleave (two sampling rates here: a client whose data changed size on resume)."""
    from opacus.accountants import create_accountant

    from fedlora.federation.privacy import ClientAccountants, PrivacyConfig

    ledger = ClientAccountants(PrivacyConfig(mode="example", clip=1.0, noise=1.1, accountant=accountant))
    rounds = [(0.1, 3)] * 40 + [(0.2, 3)] * 5 + [(0.1, 3)] * 15
    for q, steps in rounds:
        ledger.spend(7, q, steps)
    ref = create_accountant(accountant)
    for q, steps in rounds:
        for _ in range(steps):
            ref.step(noise_multiplier=1.1, sample_rate=q)
    assert ledger.epsilon(7) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)
    assert ledger.epsilon(7) > ledger.epsilon(8) == 0.0  # a client that never trained spent nothing


def test_clients_with_equal_ledgers_share_one_accountant_call(monkeypatch):
    """A round's ε for every client costs one accountant pass per distinct ledger, not per client or per round."""
    import opacus.accountants

    from fedlora.federation.privacy import ClientAccountants, PrivacyConfig, _accountant_epsilon

    calls = []
    real = opacus.accountants.create_accountant
    monkeypatch.setattr(opacus.accountants, "create_accountant", lambda name: calls.append(name) or real(name))
    _accountant_epsilon.cache_clear()
    ledger = ClientAccountants(PrivacyConfig(mode="example", clip=1.0, noise=0.9, delta=3e-6))
    for _ in range(30):
        for cid in range(12):
            ledger.spend(cid, 0.25 if cid < 8 else 0.5, 2)  # two shard sizes
    eps = {cid: ledger.epsilon(cid) for cid in range(12)}
    assert len(calls) == 2 and len(set(eps.values())) == 2 and eps[11] > eps[0]


@pytest.mark.parametrize("adapter", ["dora", "vera", "hira"])
def test_example_level_dp_refuses_adapters_opacus_cannot_clip(small_csv, capsys, adapter):
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--method", "fedit",
            "--adapter", adapter, "--dp", "example"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"not for {adapter}'s" in err and "--adapter lora or rslora" in err, err


@pytest.mark.slow
def test_example_level_dp_trains_minilm(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--clients", "2", "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--examples-per-client", "16",
            "--test-examples", "16", "--max-length", "32", "--method", "fedit", "--dp", "example", "--out", str(out)]
    assert main(argv) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["epsilon"] < math.inf and len(row["epsilon_per_client"]) == 2
