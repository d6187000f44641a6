"""`fedlora study --parts privacy-instruct`: DP on the instruction-tuning track, planned from the instruct part (its no-DP
runs reused), reported as the held-out score against ε with paired differences to FedIT and FFA-LoRA's claim; and the
privacy part's `dp-large-batch` preset (MiniLM at the DP-SGD batch where the noise is the signal's size)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import scipy.stats

from conftest import instruct_config
from fedlora.app import study
from fedlora.app.study import DEFAULT_PARTS, PARTS, InstructPlan, ReportContext, plan, preset
from fedlora.app.study_privacy_instruct import PrivacyInstructPlan, section
from fedlora.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_plan_reuses_the_instruct_runs_and_adds_each_dp_level():
    p = preset("default")
    pi = p.privacy_instruct
    assert (pi.methods, pi.noises, pi.client_noises) == (("fedit", "ffa", "fedsa"), (0.5, 1.0, 2.0), (1.0,))
    assert "privacy-instruct" in PARTS and "privacy-instruct" not in DEFAULT_PARTS
    runs = plan(p, parts=("privacy-instruct",))
    assert len(runs) == 3 * 3 * (1 + 3 + 1) and [r.seed for r in runs] == sorted(r.seed for r in runs)  # whole seeds first
    instruct = {r.name: r.config for r in plan(p, parts=("instruct",))}
    # without DP: the instruct part's runs, same names and settings, so a study that ran it reuses them
    none = [r for r in runs if r.config.dp == "none"]
    assert {r.name for r in none} == {f"instruct/{m}/seed-{s}" for m in pi.methods for s in (0, 1, 2)}
    assert all(r.config == instruct[r.name] and r.label == "instruct" for r in none)
    assert len(plan(p, parts=("instruct", "privacy-instruct"))) == len(instruct) + 3 * 3 * 4  # shared runs planned once
    for r in runs:
        r.config.validate()
        if r.config.dp == "none":
            continue
        # every other setting is the no-DP run's of the same method and seed
        twin = instruct[f"instruct/{r.method}/seed-{r.seed}"]
        dp_keys = ("dp", "dp_noise", "dp_clip", "dp_noise_cohort", "dp_population", "dp_delta")
        assert r.config.replace(**{k: getattr(twin, k) for k in dp_keys}) == twin
        if r.config.dp == "example":
            assert r.name == f"privacy-instruct-z{r.config.dp_noise:g}/{r.method}/seed-{r.seed}"
            assert (r.config.dp_noise_cohort, r.config.dp_delta, r.config.dp_clip) == (None, 1e-5, 1.0)
        else:
            assert r.name == f"privacy-instruct-client-z1/{r.method}/seed-{r.seed}" and r.config.dp == "client"
            assert (r.config.dp_noise_cohort, r.config.dp_population, r.config.dp_delta) == (1000, 10**6, 1e-7)


# ---------------------------------------------------------------------------------------------------------
# The report on fabricated histories, against numbers worked by hand

SCORES = {  # (method, level) → held-out score per seed; level: None (no DP), ("example", 1), ("client", 1)
    ("fedit", None): [0.50, 0.55, 0.60], ("ffa", None): [0.45, 0.50, 0.52],
    ("fedit", "example"): [0.35, 0.36, 0.34], ("ffa", "example"): [0.40, 0.42, 0.41],
    ("fedit", "client"): [0.40, 0.43, 0.52], ("ffa", "client"): [0.34, 0.40, 0.42],
}
BASE = [0.30, 0.33, 0.36]  # the base model's score per seed (the reference row)
FLOOR = [0.52, 0.50, 0.55]  # the constant-answer floor per seed
EPS = {"example": [3.0, 3.2, 3.4], "client": [0.9, 0.9, 0.9]}


def t_half(xs) -> float:
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def fabricated(tmp_path) -> ReportContext:
    cfg = instruct_config(tmp_path / "unused.jsonl", eval="")
    pi = PrivacyInstructPlan(methods=("fedit", "ffa"), noises=(1.0,), client_noises=(1.0,))
    p = dataclasses.replace(preset("quick"), instruct=InstructPlan(cfg, ("fedit", "ffa"), (0, 1, 2)), privacy_instruct=pi)
    runs = plan(p, parts=("privacy-instruct",))
    histories, rates = {}, {}
    for r in runs:
        level = None if r.config.dp == "none" else r.config.dp
        final = {"heldout/exact": SCORES[r.method, level][r.seed], "local_accuracy": 0.3, "reference": {"heldout/exact": BASE[r.seed]}}
        if level:
            final |= {"epsilon": EPS[level][r.seed], "delta": r.config.dp_delta}
        histories[r.name] = [final]
        rates[r.name] = FLOOR[r.seed]
    return ReportContext(p, runs, histories, "test", parts=("privacy-instruct",), rates=rates)


def test_the_section_reads_scores_epsilon_and_paired_differences(tmp_path):
    ctx = fabricated(tmp_path)
    text = section(ctx)
    scores, paired = text.split("Paired per-seed difference to `fedit`")
    fedit, ffa = SCORES["fedit", None], SCORES["ffa", None]
    # the scores against ε: mean ± 95 % t-interval over seeds, † under the floor (paired per seed), ε the mean final ε
    assert (f"| no DP | ∞ | {sum(fedit) / 3:.3f} ± {t_half(fedit):.3f} † | {sum(ffa) / 3:.3f} ± {t_half(ffa):.3f} † |") in scores
    assert "| example (DP-SGD), z = 1 | 3.20 (δ = 1e-05) | 0.350 ± 0.025 † | 0.410 ± 0.025 † |" in scores
    assert "| client, cohort-simulated, z = 1 | 0.90 (δ = 1e-07) | 0.450 ± 0.155 † |" in scores
    assert f"| base model (before training) | — | 0.330 ± {t_half(BASE):.3f} † |" in text
    assert f"| *constant answer* | — | {sum(FLOOR) / 3:.3f} ± {t_half(FLOOR):.3f} |" in text
    # ffa − fedit per seed at z = 1 (example): 0.05, 0.06, 0.07 → +0.060 ± 4.30·0.01/√3
    assert "| example (DP-SGD), z = 1 | +0.060 ± 0.025 |" in paired
    assert f"| no DP | -0.060 ± {t_half([-0.05, -0.05, -0.08]):.3f} |" in paired  # the interval clears 0: no (n.d.)
    assert "| client, cohort-simulated, z = 1 | -0.063 ± " in paired and "(n.d.)" in paired  # −0.06, −0.03, −0.10


def test_the_ffa_verdict_is_stated_per_kind_of_dp(tmp_path):
    ctx = fabricated(tmp_path)
    section(ctx)
    verdict = next(v for v in ctx.verdicts if v.startswith("- **FFA-LoRA's claim on the instruction-tuning track**"))
    # example level: cost FedIT 0.15, 0.19, 0.26; FFA 0.05, 0.08, 0.11; difference 0.10, 0.11, 0.15
    diff = [0.10, 0.11, 0.15]
    assert f"example-level DP-SGD: **holds** (z = 1 (3 seeds): FedIT 0.200 ± {t_half([0.15, 0.19, 0.26]):.3f}" in verdict
    assert f"difference +0.120 ± {t_half(diff):.3f})" in verdict
    # client level: cost FedIT 0.10, 0.12, 0.08; FFA 0.11, 0.10, 0.10; difference −0.01, 0.02, −0.02: not resolved
    assert "client-level, cohort-simulated: **not distinguishable at these seeds**" in verdict and "(n.d.)" in verdict
    # the DP runs stay above the base model (paired), so no level is capped by it
    assert "neither FedIT nor FFA stays above the base model" not in verdict
    utility = next(v for v in ctx.verdicts if v.startswith("- **Held-out task score under DP"))
    assert "example (DP-SGD), z = 1: above the base model `ffa` of 2, above the floor none" in utility


def test_a_level_at_the_base_model_is_called_capped(tmp_path):
    ctx = fabricated(tmp_path)
    for name, h in ctx.histories.items():
        if name.startswith("privacy-instruct-z1/"):  # DP-SGD left both at the base model's score
            h[-1]["heldout/exact"] = h[-1]["reference"]["heldout/exact"]
    section(ctx)
    verdict = next(v for v in ctx.verdicts if v.startswith("- **FFA-LoRA's claim on the instruction-tuning track**"))
    assert "at z = 1 neither FedIT nor FFA stays above the base model" in verdict


def test_the_part_runs_end_to_end_on_the_tiny_model(tasks_jsonl, tmp_path, capsys):
    """`fedlora study --parts privacy-instruct` with the quick preset on tiny:llama: DP-SGD and cohort runs, the
    section, and the instruct part's runs reused afterwards."""
    cfg = instruct_config(tasks_jsonl, eval="")
    quick = preset("quick")
    p = dataclasses.replace(quick, instruct=InstructPlan(cfg, ("fedit", "ffa"), (0,)),
                            privacy_instruct=dataclasses.replace(quick.privacy_instruct, methods=("fedit", "ffa")))
    runs_dir, report = tmp_path / "runs", tmp_path / "r.md"
    args = ["study", "--preset", "quick", "--runs", str(runs_dir), "--report", str(report), "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "preset", lambda name: p)
        assert main([*args, "--parts", "privacy-instruct"]) == 0
        text = report.read_text()
        assert "## 8b. Privacy on the instruction-tuning track" in text and "## 8." not in text.replace("## 8b.", "")
        cohort = [json.loads(line) for line in (runs_dir / "privacy-instruct-client-z1" / "ffa" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert cohort[-1]["epsilon_kind"] == "cohort-simulated" and cohort[-1]["dp_noise_cohort"] == 100
        # the ε column: the mean final ε over the level's methods and seeds, read from their metrics
        eps = [json.loads((runs_dir / "privacy-instruct-z1" / m / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[-1])["epsilon"]
               for m in ("fedit", "ffa") for s in (0,)]
        assert min(eps) > 0 and f"| example (DP-SGD), z = 1 | {sum(eps) / 2:.2f} (δ = 1e-05) |" in text
        assert "FFA-LoRA's claim on the instruction-tuning track" in text and "model `tiny:llama`" in text
        assert "](r/privacy-instruct.png)" in text and (tmp_path / "r" / "privacy-instruct.png").stat().st_size > 0
        capsys.readouterr()
        assert main([*args, "--parts", "instruct,privacy-instruct"]) == 0
        n = len(plan(p, parts=("instruct", "privacy-instruct")))
        assert f"{n} runs ({n} already finished)" in capsys.readouterr().err


def test_the_large_batch_preset_keeps_the_privacy_parts_epsilon_at_batch_root_p():
    """Same sampling rate and steps as the default's privacy part (so the same ε per z), expected batch ≈ √P."""
    d, big = preset("default"), preset("dp-large-batch")

    def train(c):  # a client's training examples: its shard less the local test (fedlora.data.partition's rounding)
        return c.examples_per_client - int(c.examples_per_client * c.local_test_fraction + 0.5)

    assert big.base.batch_size / train(big.base) == pytest.approx(d.base.batch_size / train(d.base), rel=1e-3)
    assert (big.base.rounds, big.base.local_steps, big.base.model) == (d.base.rounds, d.base.local_steps, d.base.model)
    lora = 2 * 6 * big.base.rank * (384 + 384)  # query and value of MiniLM-L6's six 384-wide layers
    assert big.base.batch_size ** 2 == pytest.approx(lora + 384 * 3 + 3, rel=0.02)  # + the 3-sentiment head
    runs = plan(big, parts=("privacy",))
    assert sorted((r.method, r.config.dp, r.config.dp_noise, r.seed) for r in runs if r.config.dp == "example") == [
        (m, "example", 1.0, s) for m in ("fedit", "ffa") for s in (0, 1, 2)]
    assert len(runs) == 12 and {r.config.data for r in runs} == {"tweets"} and all(r.config.batch_size == 275 for r in runs)
    assert plan(big, parts=DEFAULT_PARTS) == [] and plan(big, parts=PARTS) == runs  # no other part: each would run at that batch for hours
    for r in runs:
        r.config.validate()


def test_the_heterogeneity_section_does_not_read_the_instruct_labels_as_alphas(tmp_path):
    """The instruct parts' labels ("instruct", "privacy-instruct:1") are not partitions: a report of heterogeneity beside
    them orders only the α labels (it used to call float() on every other part's label it did not know)."""
    p = preset("default")
    parts = ("heterogeneity", "instruct", "privacy-instruct")
    runs = plan(p, parts=parts)
    fedit = next(r for r in runs if r.label == "IID" and r.method == "fedit")
    histories = {fedit.name: [{"global_accuracy": 0.5, "local_accuracy": 0.6, "local_global_gap": 0.1, "divergence": 0.1,
                               "bytes_up": 1, "bytes_down": 1, "wall_seconds": 1.0}]}
    ctx = ReportContext(p, runs, histories, "test", parts=parts, figdir=tmp_path)
    text = study._heterogeneity(ctx)
    assert "| fedit | — | — | — | 0.500 / 0.600 / 0.100 |" in text and "instruct" not in text  # α = 0.1, 0.5, 1, IID
