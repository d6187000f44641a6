"""`fedlora study` and the metrics it reads: A/B similarity, FedIT's ρ on the same uploads, the report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import scipy.stats
import torch

from conftest import tiny_config
from fedlora.app import study
from fedlora.app.experiment import run_experiment
from fedlora.app.study import PARTS, SECTIONS, all_methods, plan, preset
from fedlora.cli.main import main
from fedlora.federation.simulator import mean_pairwise_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mean_pairwise_cosine_on_known_cases():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert mean_pairwise_cosine([x, 3 * x]) == pytest.approx(1.0)
    assert mean_pairwise_cosine([x, -x]) == pytest.approx(-1.0)
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    # pairs: (a,b) 0, (a,c) 1/√2, (b,c) 1/√2
    assert mean_pairwise_cosine([a, b, c]) == pytest.approx(2 / 2**0.5 / 3)
    assert mean_pairwise_cosine([a, torch.zeros(2)]) == 0.0  # a zero update has no direction
    assert mean_pairwise_cosine([a]) is None


@pytest.mark.parametrize("method", ["fedit", "ffa", "fedsa", "florana"])
def test_runs_record_similarity_and_fedit_reference(small_csv, method):
    from fedlora.app.experiment import build

    sim = build(tiny_config(small_csv, method=method, similarity=True)).simulator
    seen = []
    original = sim.method.aggregate

    def spy(h, uploads, weights, current, ctx):  # the round's uploads, to check FedIT's ρ against a dense reference
        seen.append(([h.factors(current | u) for u in uploads], weights))
        return original(h, uploads, weights, current, ctx)

    sim.method.aggregate = spy
    hist = sim.run()
    for h, (views, w) in zip(hist, seen):
        for m, rho in h["fedit_divergence_per_layer"].items():  # FedIT's ρ on these uploads, formed densely here
            Bs, As = [v[0][m].double() for v in views], [v[1][m].double() for v in views]
            ideal = sum(c * B @ A for c, B, A in zip(w.tolist(), Bs, As))
            fedit = sum(c * B for c, B in zip(w.tolist(), Bs)) @ sum(c * A for c, A in zip(w.tolist(), As))
            dense = float(torch.linalg.matrix_norm(ideal - fedit) / torch.linalg.matrix_norm(ideal))
            assert rho == pytest.approx(dense, rel=1e-5, abs=1e-6)  # FedIT averages the float32 uploads in float32
    for h in hist:
        per = {k: h[f"similarity_{k}_per_layer"] for k in ("A", "B", "dA", "dB")}
        assert per["A"] and per["B"] and set(per["A"]) == set(per["B"])
        assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in per["A"].values())
        # FedIT's ρ on the very uploads of this round, and the bound: the run's own references
        assert set(h["fedit_divergence_per_layer"]) == set(h["divergence_per_layer"])
        for m, rho in h["divergence_per_layer"].items():
            assert rho >= h["bound_per_layer"][m] - 1e-6
            if method == "fedit":
                assert rho == h["fedit_divergence_per_layer"][m]
            if method == "florana":
                assert rho <= h["fedit_divergence_per_layer"][m] * (1 + 1e-6)
    last = hist[-1]
    if method == "ffa":  # A is the frozen shared A0: identical on every client, never updated
        assert all(v == pytest.approx(1.0) for v in last["similarity_A_per_layer"].values())
        assert last["similarity_dA_per_layer"] is None
    elif method == "fedsa":  # B is private: no common start to measure an update from
        assert last["similarity_dB_per_layer"] is None and last["similarity_dA_per_layer"]
    else:
        assert last["similarity_dA_per_layer"] and last["similarity_dB_per_layer"]


def test_similarity_is_opt_in(small_csv):
    _, hist = run_experiment(tiny_config(small_csv, method="fedit", rounds=1))
    assert not any(k.startswith("similarity_") for k in hist[0])


# ---------------------------------------------------------------------------------------------------------
# One small study with every part, privacy included, run once and read by the tests below.

METHODS = ("fedit", "fedsa", "florana", "svd")  # the comparison: every method divergence and heterogeneity need
# The report's section headings, in the order of the parts.
HEADINGS = {"comparison": "## 1. Method comparison", "divergence": "## 2. Aggregation divergence",
            "similarity": "## 3. A/B similarity", "heterogeneity": "## 4. Accuracy vs heterogeneity", "scale": "## 5. Scale",
            "synthetic": "## 6. The synthetic task", "privacy": "## 7. Privacy–utility",
            "privacy-synthetic": "## 7b. FFA-LoRA's claim where DP-SGD learns"}


def small_preset() -> study.Preset:
    """The quick preset cut down to what the report needs to show every section: two partitions (IID and α = 0.5,
    no extra α), two seeds, one synthetic level on one seed, one scale round; the privacy plan is quick's; no systems
    plan (tests/test_study_systems.py runs that part)."""
    q = preset("quick")
    iid, _, half = q.comparison
    base = q.base.replace(examples_per_client=24, test_examples=30, local_steps=1, max_length=16)
    return dataclasses.replace(
        q, base=base, comparison=(iid, half), extra_alphas=(), similarity=(iid[0], half[0]), scale_pool=48, scale_rounds=1,
        synthetic=dataclasses.replace(q.synthetic, levels=("1,1",), seeds=(0,)), systems=None,
    )


def study_cli(*args: str) -> int:
    """``fedlora study --preset quick ARGS`` with the quick preset cut down to :func:`small_preset`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "preset", lambda name: small_preset())
        return main(["study", "--preset", "quick", *args])


@pytest.fixture(scope="module")
def small_study(small_csv, tmp_path_factory, one_thread):
    """The small study's runs and report (`--parts all`); ``args``: its settings, for more reports from its runs.
    Under pytest-xdist the workers share one copy: the first to take the lock runs the study, the others read it."""

    from filelock import FileLock

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    d = root / "small-study"
    data, runs, report = d / "data.csv", d / "runs", d / "doc" / "results.md"
    args = ["--data", str(data), "--methods", ",".join(METHODS), "--runs", str(runs), "--quiet"]
    with FileLock(str(root / "small-study.lock")):
        if not report.exists():
            d.mkdir(exist_ok=True)
            shutil.copyfile(small_csv, data)  # one path for every worker: it is part of each run's settings
            assert study_cli(*args, "--parts", "all", "--report", str(report)) == 0
    return SimpleNamespace(runs=runs, report=report, args=args, text=report.read_text())


def finals(runs: Path, name: str, seeds=(0, 1)) -> list[dict]:
    return [json.loads((runs / name / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[-1]) for s in seeds]


def test_study_writes_every_section_from_its_runs(small_study):
    text, runs = small_study.text, small_study.runs
    for title in (*HEADINGS.values(), "## Reading"):
        assert title in text
    for png in ("divergence_rounds", "divergence_layers", "similarity", "heterogeneity", "scale", "privacy",
                "comparison-alpha0.5/accuracy", "synthetic-1,1/accuracy"):
        assert (small_study.report.parent / "results" / f"{png}.png").stat().st_size > 0
        assert f"](results/{png}.png)" in text
    assert "fedlora study --preset quick" in text and "**2 seeds** (0, 1)" in text and "Incomplete" not in text
    # a number in the report is the mean over seeds of the runs' metrics, with its interval from scipy
    section = text[text.index("### α=0.5"):]
    row = re.search(r"^\| florana \| ([0-9.]+) ± ([0-9.]+)", section, re.M)
    accs = [f["global_accuracy"] for f in finals(runs, "alpha0.5/florana")]
    assert float(row.group(1)) == pytest.approx(sum(accs) / 2, abs=5e-4)
    assert float(row.group(2)) == pytest.approx(scipy.stats.t.ppf(0.975, 1) * abs(accs[0] - accs[1]) / 2, abs=5e-4)
    assert "Majority-class rate of the global test set" in section
    assert "Paired difference to `fedit`" in section
    # the synthetic sweep runs every shipped method, in the layout of `fedlora compare --seeds`
    for m in all_methods():
        assert (runs / "synthetic-1,1" / m / "seed-0" / "metrics.jsonl").exists(), m
    # the scale runs spread one pool over more clients; seeds are seeds
    cfg3 = json.loads((runs / "scale3" / "fedit" / "seed-1" / "config.json").read_text())
    cfg6 = json.loads((runs / "scale6" / "fedit" / "seed-1" / "config.json").read_text())
    assert cfg3["examples_per_client"] == 2 * cfg6["examples_per_client"] and cfg3["seed"] == 1


def test_study_privacy_part_runs_dp_sgd_per_noise_level_and_reads_ffa_claim(small_study):
    text, runs = small_study.text, small_study.runs
    assert "(ε " in text and "FFA-LoRA: DP noise on both factors" in text
    # the utility verdict counts the methods that learned under DP as the table's † does
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "(ε " in line]
    at_floor = sum("†" in row[2] for row in rows)  # the z = 1 column
    utility = next(line for line in text.splitlines() if line.startswith("- **Utility under DP-SGD**"))
    assert "z = 1 (ε " in utility and f"{len(rows) - at_floor} of {len(rows)} learned" in utility
    cfg = json.loads((runs / "privacy-z1" / "ffa" / "seed-1" / "config.json").read_text())
    assert cfg["dp"] == "example" and cfg["dp_noise"] == 1.0
    fedsb = json.loads((runs / "privacy-none" / "fedsb" / "seed-0" / "config.json").read_text())
    assert fedsb["dp"] == "none" and fedsb["method_options"] == "fedsb-init=random"
    eps = [json.loads(line)["epsilon"] for line in (runs / "privacy-z1" / "fedit" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert eps == sorted(eps) and eps[0] > 0  # ε grows with every round of DP-SGD
    # the no-DP reference is the comparison's run; the part runs alone
    names = {r.name for r in plan(small_preset(), parts=("privacy",))}
    assert "iid/fedit/seed-0" in names and "privacy-none/fedit/seed-0" not in names and "privacy-none/fedsb/seed-0" in names


def test_study_privacy_synthetic_part_reads_ffa_claim_from_paired_seeds(small_study):
    """The part runs DP-SGD on the synthetic task per noise level, reuses the synthetic part's no-DP runs (Fed-SB: its
    own, random init), and its verdict's loss difference is FedIT's DP cost − FFA's, per seed, from the metrics."""
    from fedlora.app.study import _diff

    text, runs = small_study.text, small_study.runs
    cfg = json.loads((runs / "privacy-synthetic-z0.5" / "ffa" / "seed-1" / "config.json").read_text())
    assert cfg["dp"] == "example" and cfg["dp_noise"] == 0.5 and cfg["model"] == "synthetic" and cfg["data"] == "synthetic:0,0"
    fedsb = json.loads((runs / "privacy-synthetic-none" / "fedsb" / "seed-0" / "config.json").read_text())
    assert fedsb["dp"] == "none" and fedsb["method_options"] == "fedsb-init=random"
    names = {r.name for r in plan(small_preset(), parts=("privacy-synthetic",))}
    assert {"synthetic-0,0/fedit/seed-0", "privacy-synthetic-z0.5/fedsb/seed-1"} <= names
    assert "privacy-synthetic-none/fedit/seed-0" not in names

    def loss(name):
        return [f["global_loss"] for f in finals(runs, name)]

    # the quick plan has a clip-only level (z = 0): the verdict reads the noise's cost against it, per seed
    cost = {m: [dp - clip for dp, clip in zip(loss(f"privacy-synthetic-z0.5/{m}"), loss(f"privacy-synthetic-z0/{m}"))] for m in ("fedit", "ffa")}
    expected = _diff(cost["fedit"], cost["ffa"])[2]
    verdict = next(line for line in text.splitlines() if line.startswith("- **FFA-LoRA's claim where DP-SGD learns"))
    assert "against DP-SGD's clipping alone (z = 0)" in verdict and f"difference {expected}" in verdict
    # and the whole DP-SGD cost against no DP is in the section: the synthetic part's runs
    whole = {m: [dp - none for dp, none in zip(loss(f"privacy-synthetic-z0.5/{m}"), loss(f"synthetic-0,0/{m}"))] for m in ("fedit", "ffa")}
    assert f"difference {_diff(whole['fedit'], whole['ffa'])[2]}" in text[text.index("Loss added by DP-SGD as a whole"):]
    clip_only = json.loads((runs / "privacy-synthetic-z0" / "ffa" / "seed-0" / "config.json").read_text())
    assert clip_only["dp"] == "example" and clip_only["dp_noise"] == 0.0
    assert any(word in verdict for word in ("holds", "does not hold here", "not distinguishable"))
    section = text[text.index("## 7b."):]
    assert "| ffa | acc " in section and "ε per noise level" in section and "z = 0.5: " in section
    # which one is better at a level: FedIT's final accuracy minus FFA's, paired per seed, from the metrics
    acc = {m: [f["global_accuracy"] for f in finals(runs, f"privacy-synthetic-z0.5/{m}")] for m in ("fedit", "ffa")}
    head = section[section.index("Which is better at each level"):].split("\n")[0]
    assert f"z = 0.5 (2 seeds): accuracy {_diff(acc['fedit'], acc['ffa'])[2]}, loss " in head and "no DP (2 seeds)" in head
    assert "in absolute terms FedIT's final accuracy is above FFA's at " in verdict
    figure = re.search(r"!\[loss against ε on the synthetic task\]\(([^)]+)\)", section)
    assert figure and (small_study.report.parent / figure.group(1)).stat().st_size > 0


def test_report_sections_follow_the_order_of_the_parts(small_study, tmp_path):
    assert [part for part, _ in SECTIONS if part in PARTS] == list(PARTS)
    headings = [line for line in small_study.text.splitlines() if line.startswith("## ")]
    # the quick preset has no instruction-tuning plan (a causal LM's runs; tests/test_instruct.py and
    # tests/test_study_privacy_instruct.py cover those sections), and the small one no systems plan
    # (tests/test_study_systems.py)
    assert [next(p for p, h in HEADINGS.items() if line.startswith(h)) for line in headings[:-1]] == [
        p for p in PARTS if p not in ("instruct", "privacy-instruct", "systems")]
    assert headings[-1] == "## Reading: which claims hold here"
    assert small_study.text.index("Protocol:") < small_study.text.index(headings[0])
    # --report-only from the same runs, two parts asked for in the other order: only theirs, in the parts' order
    report = tmp_path / "two.md"
    assert study_cli(*small_study.args, "--parts", "scale,similarity", "--report", str(report), "--report-only") == 0
    headings = [line for line in report.read_text().splitlines() if line.startswith("## ")]
    assert [h[:5] for h in headings] == ["## 3.", "## 5.", "## Re"]


def test_study_reuses_its_runs_and_writes_the_readme_table(small_study, tmp_path, capsys):
    # Run again, parts in another order: nothing retrains, the report is rewritten from the finished runs, the same.
    runs = small_study.runs
    stamp = (runs / "iid" / "fedit" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study table: generated by `fedlora study --readme` -->\nPLACEHOLDER\n<!-- end of study table -->\nrest\n")
    args = [*small_study.args, "--parts", ",".join(reversed(PARTS)), "--report", str(tmp_path / "again.md"), "--readme", str(readme)]
    capsys.readouterr()
    assert study_cli(*args) == 0
    n = len(plan(small_preset(), methods=METHODS, parts=PARTS))
    assert f"{n} runs ({n} already finished)" in capsys.readouterr().err
    assert (runs / "iid" / "fedit" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    command = re.compile(r"^    fedlora study .*$", re.M)
    again = (tmp_path / "again.md").read_text().replace("](again/", "](results/")
    assert command.sub("", again) == command.sub("", small_study.text)

    # The README's table: one accuracy cell per method and partition, with the majority-class rate.
    table = readme.read_text()
    assert table.startswith("intro\n") and table.endswith("rest\n") and "PLACEHOLDER" not in table
    row = re.search(r"^\| florana \| .* \| ([0-9.]+) ± [0-9.]+[^|]* \|$", table, re.M)
    accs = [f["global_accuracy"] for f in finals(runs, "alpha0.5/florana")]
    assert float(row.group(1)) == pytest.approx(sum(accs) / 2, abs=5e-4)
    assert "| *majority-class rate* |" in table


def test_study_parts_run_alone_and_plan_whole_seeds():
    p = preset("default")
    runs = plan(p, parts=("comparison",))
    assert len(runs) == 7 * 3 * 3 and {r.seed for r in runs} == {0, 1, 2}
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seed by seed: a study cut short has whole seeds
    assert {r.label for r in runs} == {"IID", "α=1", "α=0.5"}
    syn = plan(p, parts=("synthetic",))
    assert len(syn) == 20 * 3 * len(all_methods()) and all(r.config.data.startswith("synthetic:") for r in syn)
    assert {r.config.optimizer for r in syn} == {"sgd"}


def test_study_refuses_a_runs_directory_made_with_other_settings(small_csv, tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["study", "--preset", "quick", "--data", str(small_csv), "--methods", "fedit", "--parts", "comparison",
            "--seeds", "1", "--runs", str(runs), "--quiet"]
    assert main(base) == 0
    saved = runs / "iid" / "fedit" / "seed-0" / "config.json"
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"lr": 0.5}))
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error:") and "holds a fedit run with other settings" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--parts", "comparison,plots"], "unknown study part 'plots'"),
    (["--methods", "fedit,fedavg"], "unknown method 'fedavg'"),
    (["--preset", "huge"], "unknown study preset 'huge'"),
])
def test_study_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["study", *args, "--runs", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_ffa_claim_against_clip_only_reads_the_noises_cost_per_seed():
    """With a clip-only level (z = 0) the claim's cost is loss(z) − loss(0) per seed: FedIT's − FFA's, paired."""
    from fedlora.app.study import _diff, _ffa_cells

    loss = {("fedit", None): [1.0, 1.1, 1.2], ("fedit", 0.0): [1.5, 1.5, 1.7], ("fedit", 4.0): [1.9, 2.0, 2.3],
            ("ffa", None): [1.2, 1.2, 1.3], ("ffa", 0.0): [1.4, 1.6, 1.6], ("ffa", 4.0): [1.5, 1.8, 1.7]}

    def at(m, z):
        return {s: [{"global_loss": v}] for s, v in enumerate(loss[m, z])}

    cells, holds, contrary, _ = _ffa_cells((0.0, 4.0), at, {}, "global_loss", -1, 0.0)
    fedit = [a - b for a, b in zip(loss["fedit", 4.0], loss["fedit", 0.0])]  # 0.4, 0.5, 0.6
    ffa = [a - b for a, b in zip(loss["ffa", 4.0], loss["ffa", 0.0])]  # 0.1, 0.2, 0.1
    assert len(cells) == 1 and cells[0].startswith("z = 4 (3 seeds)") and f"difference {_diff(fedit, ffa)[2]}" in cells[0]
    assert (holds, contrary) == (1, 0)  # per-seed differences 0.3, 0.3, 0.5: the interval excludes 0
    whole, _, _, _ = _ffa_cells((0.0, 4.0), at, {}, "global_loss", -1, None)  # against no DP: both levels
    assert [c[:5] for c in whole] == ["z = 0", "z = 4"]
