"""Client-level DP at realistic cohorts (noise cohort), adaptive clipping (Andrew et al. 2021) and parity with
Flower's and Opacus's accountants (docs/privacy.md)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.app.experiment import build
from fedlora.cli.main import main
from fedlora.federation.privacy import (
    PrivacyConfig,
    RunPrivacy,
    adapt_clip,
    cohort_noise_std,
    epsilon_spent,
    privatise,
    update_noise_multiplier,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _opacus_rdp(z: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


def test_our_clip_and_noise_std_are_flowers_fixed_clipping():
    """Flower's fixed-clipping math on the same update: its compute_clip_model_update leaves start + the update scaled
    to norm C (ours too), and its compute_stdv(z, C, m) is our noise std on the average."""
    flwr_dp = pytest.importorskip("flwr.supercore.differential_privacy")
    import numpy as np

    gen = torch.Generator().manual_seed(2)
    start = {"a": torch.randn(6, 3, generator=gen, dtype=torch.float64), "b": torch.randn(4, generator=gen, dtype=torch.float64)}
    upload = {k: v + 3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in start.items()}
    cfg = PrivacyConfig(mode="client", clip=0.9, noise=0.0)
    ours, diag = privatise([upload], [start], cfg, expected=1.0, seed=0)
    theirs = [upload[k].numpy().copy() for k in ("a", "b")]
    flwr_dp.compute_clip_model_update(theirs, [start[k].numpy() for k in ("a", "b")], 0.9)
    for k, t in zip(("a", "b"), theirs):
        assert np.allclose(ours[0][k].numpy(), t, rtol=0, atol=1e-12)
    assert diag["clipped"] == 1
    z_cfg = PrivacyConfig(mode="client", clip=0.9, noise=1.2)
    assert privatise([upload] * 3, [start] * 3, z_cfg, expected=3.0, seed=0)[1]["noise_std"] == pytest.approx(flwr_dp.compute_stdv(1.2, 0.9, 3), rel=1e-15)


# ---- the noise cohort -----------------------------------------------------------------------------------------------


def test_noise_cohort_noise_std_by_hand():
    """Noise on the average is z·C/cohort (not z·C/m): 20,000 coordinates of zero updates, within 3 %; it equals
    Flower's compute_stdv(z, C, cohort), and without a cohort privatise's noise is unchanged bit for bit."""
    z, clip, m, cohort = 1.3, 0.7, 4.0, 500
    start = {"a": torch.zeros(20_000, dtype=torch.float64)}
    uploads = [dict(start) for _ in range(4)]
    cfg = PrivacyConfig(mode="client", clip=clip, noise=z)
    out, diag = privatise(uploads, [start] * 4, cfg, expected=m, seed=3, divisor=cohort)
    mean = sum(u["a"] for u in out) / len(out)  # the uniform-weighted sum the rule sees
    assert diag["noise_std"] == z * clip / cohort == cohort_noise_std(z, clip, cohort)
    assert float(mean.std()) == pytest.approx(z * clip / cohort, rel=0.03)
    plain, _ = privatise(uploads, [start] * 4, cfg, expected=m, seed=3)
    same, _ = privatise(uploads, [start] * 4, cfg, expected=m, seed=3, divisor=m)
    assert torch.equal(plain[0]["a"], same[0]["a"])
    assert float((sum(u["a"] for u in plain) / 4).std()) == pytest.approx(z * clip / m, rel=0.03)
    flwr_dp = pytest.importorskip("flwr.supercore.differential_privacy")
    assert flwr_dp.compute_stdv(z, clip, cohort) == pytest.approx(cohort_noise_std(z, clip, cohort), rel=1e-15)


def test_cohort_epsilon_is_opacus_at_the_cohorts_sampling_rate(small_csv):
    """A run with --dp-noise-cohort C --dp-population N accounts at q = C/N (Opacus stepped by hand), marks its ε as
    cohort-simulated, and its noise on the average is z·C/cohort; only the sampled clients train."""
    cfg = tiny_config(small_csv, method="fedit", dp="client", dp_clip=0.5, dp_noise=1.1, rounds=2, clients=3, fraction=0.67,
                      dp_noise_cohort=200, dp_population=20_000, dp_delta=1e-6)
    history = build(cfg).simulator.run()
    for h in history:
        assert h["epsilon"] == pytest.approx(_opacus_rdp(1.1, 200 / 20_000, h["round"], 1e-6), rel=1e-9)
        assert h["epsilon_kind"] == "cohort-simulated" and h["dp_noise_cohort"] == 200 and h["dp_population"] == 20_000
        assert h["dp_noise_std"] == pytest.approx(1.1 * 0.5 / 200, rel=1e-12)
        assert 1 <= len(h["clients"]) <= 3
    # the same run without the cohort accounts at --fraction and has no cohort mark
    plain = build(cfg.replace(dp_noise_cohort=None, dp_population=None, dp_delta=1e-5)).simulator.run()
    assert "epsilon_kind" not in plain[-1]
    assert plain[-1]["epsilon"] == pytest.approx(epsilon_spent(1.1, 0.67, 2, 1e-5), rel=1e-12)
    # a comparison table names the cohort's ε as simulated, and a plain run's ε plainly
    from fedlora.app.report import final_row, markdown_table

    assert "| ε (cohort-simulated: not a guarantee of this run) |" in markdown_table([final_row("fedit", history, 1.0)])
    assert "| ε |" in markdown_table([final_row("fedit", plain, 1.0)])


# ---- adaptive clipping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile_of_synthetic_norms(quantile):
    """Andrew et al.'s geometric update with the default η_C = 0.2 and σ_b = m/20, from a clip 100× off: after 400
    rounds of 100 log-normal norms the clip lies within the norm distribution's (Q − 0.05, Q + 0.05) quantiles."""
    gen = torch.Generator().manual_seed(0)
    dist = torch.distributions.LogNormal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    torch.manual_seed(1)
    m = 100
    clip, clips = 100.0, []
    for _ in range(400):
        norms = dist.sample((m,)).tolist()
        clip, _ = adapt_clip(clip, norms, quantile, 0.2, m / 20, m, m, gen)
        clips.append(clip)
    settled = sum(clips[-100:]) / 100
    icdf = lambda p: math.exp(0.7 * float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p))))  # noqa: E731
    assert icdf(quantile - 0.05) < settled < icdf(quantile + 0.05)


def test_adaptive_clip_step_is_flowers_geometric_update_given_the_papers_bit():
    """Without count noise and with the expected participants all present, our step equals Flower 1.41's server-side
    adaptive clipping fed the paper's bit b = 1[‖Δ‖ ≤ C] (Flower's own aggregate_train counts the clipped clients,
    1 − b: docs/privacy.md, "Flower")."""
    strategy = pytest.importorskip("flwr.serverapp.strategy")
    flower = strategy.DifferentialPrivacyServerSideAdaptiveClipping(strategy.FedAvg(), noise_multiplier=0.0, num_sampled_clients=20,
                                                                    initial_clipping_norm=3.0)
    assert (flower.target_clipped_quantile, flower.clip_norm_lr) == (0.5, 0.2)  # our defaults: PrivacyConfig's clip_lr, no quantile default
    assert PrivacyConfig().clip_lr == flower.clip_norm_lr
    gen = torch.Generator().manual_seed(0)
    norms_gen = torch.Generator().manual_seed(5)
    clip = 3.0
    for _ in range(30):
        norms = (torch.rand(20, generator=norms_gen, dtype=torch.float64) * 4).tolist()
        unclipped = sum(x <= flower.clipping_norm for x in norms)
        flower._geometric_update(flower._noisy_fraction(unclipped, 20))
        clip, _ = adapt_clip(clip, norms, 0.5, 0.2, 0.0, 20, 20, gen)
        assert clip == pytest.approx(flower.clipping_norm, rel=1e-12)


def test_adaptive_clipping_epsilon_includes_the_count_noise():
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) equals Flower's compute_adaptive_noise_params; the two releases (update at z_Δ,
    centred count at σ_b, sensitivity ½) compose in RDP to one Gaussian of multiplier z (Opacus at q = 1); so the
    adaptive run's ε, accounted at z, exceeds the ε of fixed clipping with the same update noise z_Δ."""
    z, sigma_b, steps, delta = 1.0, 2.0, 7, 1e-5
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((z ** -2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-15) and z_update > z
    from opacus.accountants import RDPAccountant

    both = RDPAccountant()
    both.history = [(z_update, 1.0, steps), (2 * sigma_b, 1.0, steps)]  # the count's multiplier: σ_b / sensitivity ½
    assert both.get_epsilon(delta) == pytest.approx(_opacus_rdp(z, 1.0, steps, delta), rel=1e-9)
    run = RunPrivacy(PrivacyConfig(mode="client", clip=1.0, noise=z, clip_quantile=0.5, clip_count_std=sigma_b), 0.1, expected=5.0)
    assert run.update_noise == pytest.approx(z_update, rel=1e-15)
    eps = run.metrics(steps)["epsilon"]
    assert eps == pytest.approx(epsilon_spent(z, 0.1, steps, delta), rel=1e-12)
    assert eps > epsilon_spent(z_update, 0.1, steps, delta)
    flwr_dp = pytest.importorskip("flwr.supercore.differential_privacy")
    assert flwr_dp.compute_adaptive_noise_params(z, 40, sigma_b) == (sigma_b, pytest.approx(z_update, rel=1e-12))
    assert flwr_dp.compute_adaptive_noise_params(z, 40, None)[0] == 40 / 20  # σ_b's default: m/20, as ours
    assert RunPrivacy(PrivacyConfig(mode="client", noise=z, clip_quantile=0.5), 0.1, expected=40.0).count_std == 2.0


def test_adaptive_clipping_run_moves_the_clip_and_resumes_it(small_csv, tmp_path):
    """End to end: the clip used each round is the previous round's adapted one; the noise on the average is
    z_Δ·C_t/m; the clip is in the checkpoint, so a resumed run continues from it."""
    cfg = tiny_config(small_csv, method="fedit", dp="client", dp_clip=5.0, dp_noise=0.2, rounds=3, fraction=1.0,
                      dp_clip_quantile=0.5, dp_clip_count_std=1.0)
    history = build(cfg).simulator.run()
    z_update = update_noise_multiplier(0.2, 1.0)
    assert history[0]["dp_clip_used"] == 5.0
    for before, after in zip(history, history[1:]):
        assert after["dp_clip_used"] == before["dp_clip"] != before["dp_clip_used"]
    for h in history:
        assert h["dp_noise_std"] == pytest.approx(z_update * h["dp_clip_used"] / 3, rel=1e-12)
        assert h["epsilon"] == pytest.approx(epsilon_spent(0.2, 1.0, h["round"], 1e-5), rel=1e-12)
    resume_matches(cfg, tmp_path, ("dp_clip_used", "dp_clip", "dp_noise_std", "global_accuracy"), history)


def test_cli_marks_a_cohort_simulated_epsilon(small_csv, tmp_path, capfd):
    """The round line, metrics.jsonl and summary.md say the ε is the simulated cohort's, not the run's own."""
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--method", "fedit",
                 "--dp", "client", "--dp-noise", "1", "--dp-noise-cohort", "100", "--dp-population", "10000", "--dp-delta", "1e-6",
                 "--dp-clip-quantile", "0.5", "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert "cohort-simulated)" in printed.out + printed.err  # the round line: ε … (δ 1e-06, cohort-simulated)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epsilon_kind"] == "cohort-simulated" and row["dp_clip_count_std"] == 100 / 20
    summary = (out / "summary.md").read_text()
    assert "**ε is cohort-simulated**" in summary and "not a privacy guarantee for this run" in summary and "adaptive clip" in summary


# ---- Flower's accountant ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 5000 / 1_000_000, 200), (2.0, 0.5, 20), (0.8, 200 / 20_000, 60), (2.0, 1.0, 5)])
def test_flower_rdp_accountant_equals_ours_and_opacus(z, q, steps):
    """For the same events (z, Poisson rate q, steps, δ) ours (--dp-accountant rdp) is Opacus's called directly (to
    1e-12), and Flower's RdpAccountant (flwr.serverapp; Google's dp-accounting underneath) agrees with it to 0.5 %
    for q ≤ 0.1 and 1.5 % for larger q, at ε < 10 (measured over z ∈ [0.6, 3], q ∈ [0.001, 1], 1–1000 steps,
    δ ∈ {1e-5, 1e-7}: at most 0.26 % and 1.03 %; the two use different RDP orders and fractional-order series, and at
    ε ≫ 10 they part further: docs/privacy.md)."""
    pytest.importorskip("dp_accounting")
    delta = 1e-6
    ours = epsilon_spent(z, q, steps, delta)
    assert ours == pytest.approx(_opacus_rdp(z, q, steps, delta), rel=1e-12)
    assert ours < 10
    flower = epsilon_spent(z, q, steps, delta, "flower")
    assert flower == pytest.approx(ours, rel=5e-3 if q <= 0.1 else 1.5e-2)
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
    from flwr.serverapp import PrivacyConfig as FlowerPrivacy

    if q < 1:  # Flower's own API, called by hand: sample_size of population_size
        population = 1_000_000 if q == 5000 / 1_000_000 else 20_000 if q == 200 / 20_000 else 2
        acc = RdpAccountant(FlowerPrivacy(target_delta=delta, population_size=population, sampling_method=SamplingMethod.POISSON,
                                          neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE))
        acc.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=round(q * population), population_size=population), count=steps)
        assert acc.get_epsilon(delta) == pytest.approx(flower, rel=1e-12)


def test_flower_accountant_in_a_cohort_run(small_csv):
    pytest.importorskip("dp_accounting")
    cfg = tiny_config(small_csv, method="fedit", dp="client", dp_noise=1.0, rounds=1, dp_noise_cohort=100, dp_population=10_000,
                      dp_delta=1e-6, dp_accountant="flower")
    h = build(cfg).simulator.run()[-1]
    assert h["dp_accountant"] == "flower" and h["epsilon"] == pytest.approx(_opacus_rdp(1.0, 0.01, 1, 1e-6), rel=5e-3)


# ---- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--fraction", "1", "--dp-noise-cohort", "2", "--dp-population", "100"], "--dp-noise-cohort 2 is smaller than the 3 clients a round samples"),
    (["--dp-noise-cohort", "50", "--dp-population", "10"], "--dp-population 10 is smaller than the noise cohort 50"),
    (["--dp-noise-cohort", "50"], "--dp-noise-cohort and --dp-population go together"),
    (["--dp-clip-quantile", "1.5"], "--dp-clip-quantile 1.5 is outside (0, 1)"),
    (["--dp-clip-quantile", "0"], "--dp-clip-quantile 0.0 is outside (0, 1)"),
    (["--dp-clip-quantile", "0.5", "--dp-noise", "1"], "is not below 2σ_b"),
    (["--dp-clip-quantile", "0.5", "--dp-clip-lr", "0"], "--dp-clip-lr 0.0 must be a positive number"),
    (["--dp", "example", "--dp-clip-quantile", "0.5"], "it needs --dp client (not --dp example)"),
    (["--dp", "example", "--dp-noise-cohort", "10", "--dp-population", "100"], "it needs --dp client (not --dp example)"),
    (["--dp", "example", "--dp-accountant", "flower"], "--dp-accountant flower accounts client-level releases"),
])
def test_bad_cohort_and_adaptive_settings_are_one_line_errors(small_csv, capsys, extra, message):
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--method", "fedit", "--dp", "client", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error:") and "\n" not in err and message in err, err


def test_a_fractional_cohort_from_toml_or_flower_is_refused():
    from fedlora.app.config import RunConfig

    assert RunConfig(dp="client", dp_noise_cohort=5000.0, dp_population=1e6).privacy_config().noise_cohort == 5000
    with pytest.raises(ValueError, match="--dp-noise-cohort 2.5 must be a whole number of clients"):
        RunConfig(dp="client", dp_noise_cohort=2.5, dp_population=10).privacy_config()


def test_flower_accountant_without_its_backend_is_one_line(small_csv, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if flwr[dp] were not installed
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--method", "fedit",
            "--dp", "client", "--dp-accountant", "flower"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "flwr[dp]"' in err, err


def test_cohort_and_adaptive_clipping_on_flower_equal_the_simulator(small_csv, tmp_path):
    """The noise cohort and the adaptive clip live in the server half of the round both engines share."""
    pytest.importorskip("flwr")
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="ffa", dp="client", dp_clip=2.0, dp_noise=1.0, fraction=0.67, rounds=3, dp_noise_cohort=100,
                      dp_population=10_000, dp_delta=1e-6, dp_clip_quantile=0.5)
    reference = build(cfg).simulator.run()
    history = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    for key in ("epsilon", "epsilon_kind", "dp_clip", "dp_clip_used", "dp_noise_std"):
        assert [h[key] for h in history] == [h[key] for h in reference], key


def test_flower_accountant_is_quiet_where_dp_accounting_drops_orders(capfd, caplog):
    """dp-accounting warns of every fractional RDP order whose series does not converge (z = 0.5, q = 0.1); the bound
    stays valid, and a run's stderr stays clean (as for Opacus's warnings)."""
    pytest.importorskip("dp_accounting")
    assert epsilon_spent(0.5, 0.1, 7, 1e-5, "flower") == pytest.approx(epsilon_spent(0.5, 0.1, 7, 1e-5), rel=1.5e-2)
    assert "failed to converge" not in capfd.readouterr().err + caplog.text
