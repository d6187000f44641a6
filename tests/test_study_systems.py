"""`fedlora study --parts systems`: its plan (arms, budgets, seeds, FLoRA-NA without FedBuff), a quick run end to end,
and the report's numbers against a hand computation on fabricated histories."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from types import SimpleNamespace

import pytest
import scipy.stats

from fedlora.app import study
from fedlora.app import study_systems as ss
from fedlora.app.study import DEFAULT_PARTS, PARTS, ReportContext, plan, preset
from fedlora.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_systems_is_a_part_asked_for_by_name():
    assert "systems" in PARTS and "systems" not in DEFAULT_PARTS
    from fedlora.cli.main import build_parser

    assert "systems" not in build_parser().parse_args(["study"]).parts.split(",")
    assert not any(r.label.startswith("systems:") for r in plan(preset("quick"), parts=DEFAULT_PARTS))


def test_systems_plan_arms_budgets_seeds_and_florana_synchronous_only(monkeypatch):
    """Default preset (the deadline stubbed: deriving it builds MiniLM): every method in its arms, per setting and seed;
    one budget of client updates per setting; FLoRA-NA in the synchronous arms only."""
    monkeypatch.setattr(ss, "derive_deadline", lambda cfg, q: 7.5 if cfg.model == "synthetic" else 30.0)
    p = preset("default")
    runs = plan(p, parts=("systems",))
    sp = p.systems
    assert set(sp.methods) >= {"fedit", "flora", "fedex", "florana", "fedsb", "ffa", "fedsa"}
    by_setting = {s: [r for r in runs if r.label.startswith(f"systems:{s}:")] for s in ("synthetic", "base")}
    assert {r.seed for r in by_setting["synthetic"]} == set(range(10)) and {r.seed for r in by_setting["base"]} == set(p.seeds)
    assert len(p.seeds) >= 3
    n_arms = sum(len(ss.arms_of(m)) for m in sp.methods)
    assert n_arms == 3 * len(sp.methods) - 1  # florana: no fedbuff
    assert len(by_setting["synthetic"]) == 10 * n_arms and len(by_setting["base"]) == len(p.seeds) * n_arms
    assert not any(r.method == "florana" and r.config.async_mode for r in runs)
    for setting, rs in by_setting.items():
        assert len({ss.update_budget(r.config) for r in rs}) == 1, setting  # the same budget in every arm
        for r in rs:
            c = r.config
            if r.seed == 0:  # every setting, arm and method validates (its seeds differ in the seed alone)
                c.validate()
            assert c.devices == "default" and c.fraction == sp.fraction
            arm = r.label.split(":")[2]
            assert r.name == f"systems-{setting}/{arm}/{r.method}/seed-{r.seed}"
            assert (c.deadline, c.over_select, c.availability, c.async_mode) == {
                "sync": (None, 1.0, sp.availability, ""),
                "deadline": (7.5 if setting == "synthetic" else 30.0, sp.over_select, sp.availability, ""),
                "fedbuff": (None, 1.0, "", "fedbuff")}[arm]
    syn, base = by_setting["synthetic"][0].config, by_setting["base"][0].config
    assert syn.model == "synthetic" and syn.data == f"synthetic:{sp.level}" and base.model == p.base.model
    # the budget is the base's: rounds × clients per round at fraction 1, the same updates at fraction 0.5
    assert ss.update_budget(base) == ss.update_budget(p.base) and ss.update_budget(syn) == ss.update_budget(p.synthetic.base)
    assert [r.seed for r in by_setting["synthetic"]] == sorted(r.seed for r in by_setting["synthetic"])  # whole seeds


def test_deadline_keeps_the_mix_quantile_and_drops_the_rest(monkeypatch):
    """The rule by hand: profiles sorted by round time, cumulative weight reaches q at the slowest kept; the deadline
    is the geometric mean of its time and the next's."""
    times = {"a": 1.0, "b": 4.0, "c": 9.0, "d": 16.0}
    monkeypatch.setattr(ss, "profile_round_times", lambda cfg: times)
    monkeypatch.setattr(ss, "mix_weights", lambda devices: {"a": 3, "b": 4, "c": 2, "d": 1})
    cfg = SimpleNamespace(devices="default")
    assert ss.derive_deadline(cfg, 0.7) == pytest.approx(math.sqrt(4.0 * 9.0))  # 3 + 4 of 10 = 0.7
    assert ss.derive_deadline(cfg, 0.75) == pytest.approx(math.sqrt(9.0 * 16.0))
    assert ss.derive_deadline(cfg, 1.0) == 16.0  # nobody slower: the slowest's time


def _hist(accs, clocks, mb, drops=None):
    """A fabricated run: per round accuracy, sim_clock, and MB moved that round (half up, half down)."""
    out = []
    for i, (a, t, b) in enumerate(zip(accs, clocks, mb)):
        m = {"round": i + 1, "global_accuracy": a, "sim_clock": t, "bytes_up": b * 5e5, "bytes_down": b * 5e5, "wall_seconds": 1.0}
        if drops is not None:
            d = drops[i]
            m |= {"dropped": [{"reason": r} for r in d], "n_dropped": len(d), "wasted_examples": 10 * len(d), "wasted_bytes": 1e6 * len(d)}
        out.append(m)
    return out


def test_report_numbers_match_a_hand_computation(tmp_path):
    q = preset("quick")
    p = dataclasses.replace(q, systems=dataclasses.replace(q.systems, methods=("fedit", "florana"), synthetic_seeds=(0, 1, 2)),
                            seeds=(0,))
    runs = [r for r in ss.systems_runs(p, deadlines={"synthetic": 0.5, "base": 2.0}) if r.label.startswith("systems:synthetic:")]
    h = {
        ("fedit", "sync"): [_hist([0.5, 0.8], [1, 2], [1, 1], [[], ["dropout"]]), _hist([0.6, 0.7], [1, 2], [1, 1], [[], []]),
                            _hist([0.4, 0.9], [1, 2], [1, 1], [["dropout"], []])],
        ("fedit", "deadline"): [_hist([0.7, 0.8], [0.5, 1], [2, 2], [["deadline", "surplus"], []]),
                                _hist([0.5, 0.75], [0.5, 1], [2, 2], [[], ["deadline"]]), _hist([0.3, 0.5], [0.5, 1], [2, 2], [[], []])],
        ("fedit", "fedbuff"): [_hist([0.8, 0.9], [0.3, 0.6], [1, 1])] * 3,
        ("florana", "sync"): [_hist([0.6, 0.85], [1, 2], [1, 1], [[], []])] * 3,
        ("florana", "deadline"): [_hist([0.6, 0.7], [0.5, 1], [1, 1], [[], []])] * 3,
    }
    histories = {r.name: h[r.method, r.label.split(":")[2]][r.seed] for r in runs}
    ctx = ReportContext(p, runs, histories, command="test", parts=("systems",), figdir=tmp_path / "figs",
                        rates={r.name: 0.3 for r in runs})
    ctx.figdir.mkdir()
    text = ss.section(ctx)
    # target: 0.9 × the best sync method's mean final accuracy: florana's 0.85 (fedit's is 0.8)
    target = 0.9 * 0.85
    assert f"global accuracy ≥ {target:.3f} (0.9 × `florana`'s mean final accuracy in the sync arm, 0.850)" in text
    rows = {tuple(line.split(" | ")[:2]): line.removesuffix(" |").split(" | ") for line in text.splitlines() if line.startswith("| ")}
    t = scipy.stats.t.ppf(0.975, 2)
    # fedit sync: finals 0.8, 0.7, 0.9 → 0.8 ± t·sd/√3; reaches 0.765 at round 2 of seeds 0 and 2 (seed 1 never), at 2 s, 2 MB
    sync = rows["| fedit", "sync"]
    mean, half = 0.8, t * 0.1 / math.sqrt(3)
    assert sync[3] == f"{mean:.3f} ± {half:.3f}" and sync[4] == "2/3" and sync[5] == "2.000 ± 0.000" and sync[6] == "2.000 ± 0.000"
    assert sync[8] == "0.7 (dropout 0.7)" and sync[9].startswith("6.7 ± ")  # 2 drops over 3 seeds, 10 examples each
    # fedit deadline: finals 0.8, 0.75, 0.5 (mean 0.683: its interval not clear of 0.3 + margin → †); reached at round 2 by seed 0
    # (round 1's 0.7 is below), at 1 s and 4 MB; seed 1's 0.75 is below 0.765; paired Δ to fedit-sync per seed 0, .05, −.4
    dl = rows["| fedit", "deadline"]
    assert "†" in dl[3] and dl[4] == "1/3" and dl[5] == "1.000" and dl[6] == "4.000"
    assert dl[8] == "1.0 (deadline 0.7, surplus 0.3)"
    diffs = [0.0, 0.05, -0.4]
    sd = math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert dl[10] == f"{sum(diffs) / 3:+.3f} ± {t * sd / math.sqrt(3):.3f} (n.d.)"
    assert dl[11] == "-1.000 (one seed, n.d.) [1]"  # seed 0 reached in both: 1 s − 2 s
    # FedBuff records no drops; florana has no fedbuff arm
    fb = rows["| fedit", "fedbuff"]
    assert fb[4] == "3/3" and fb[5] == "0.300 ± 0.000" and fb[8] == "— (none recorded)"
    assert "synchronous only" in rows["| florana", "fedbuff"][3]
    assert (tmp_path / "figs" / "systems-synthetic-fedbuff" / "accuracy_time.png").stat().st_size > 0
    # a best synchronous method at the majority-class rate makes the target say so
    floor = ReportContext(p, runs, histories, command="test", parts=("systems",), rates={r.name: 0.85 for r in runs})
    assert "no synchronous method learned" in ss.setting_target(floor, "synthetic", p.systems)[1]
    assert "no synchronous method learned" not in ss.setting_target(ctx, "synthetic", p.systems)[1]
    # the reading: each arm against the same method's sync runs, per seed. florana deadline − sync: −0.15 on every seed
    # (resolved); fedit fedbuff − sync time to target: 0.3 − 2 s on seeds 0 and 2 (resolved); the rest n.d.
    verdict = ctx.verdicts[-1]
    assert verdict.startswith("- **Systems, synthetic: `synthetic` on `synthetic:0,0`:")
    assert "deadline: final accuracy lower for `florana`" in verdict and "fedbuff: time to target shorter for `fedit`" in verdict
    assert "`fedit`, " not in verdict.partition("deadline:")[2].partition("·")[0]  # fedit's deadline differences are n.d.


def small_systems_preset() -> study.Preset:
    """The quick preset's systems part cut to what the end-to-end test needs: two methods (one synchronous only), one seed."""
    q = preset("quick")
    base = q.base.replace(examples_per_client=24, test_examples=30, local_steps=1, max_length=16, rounds=1)
    syn = dataclasses.replace(q.synthetic, base=q.synthetic.base.replace(rounds=1))
    return dataclasses.replace(q, base=base, seeds=(0,), synthetic=syn,
                               systems=dataclasses.replace(q.systems, methods=("fedit", "florana"), synthetic_seeds=(0,)))


def test_systems_part_runs_end_to_end_and_writes_its_section(small_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "preset", lambda name: small_systems_preset())
    runs, report = tmp_path / "runs", tmp_path / "doc" / "results.md"
    assert main(["study", "--preset", "quick", "--parts", "systems", "--data", str(small_csv), "--runs", str(runs),
                 "--report", str(report), "--quiet"]) == 0
    text = report.read_text()
    assert "## 9. Systems" in text and "### synthetic: `synthetic` on `synthetic:0,0`" in text and "### base: `tiny:bert` on `" in text
    assert "## 1." not in text and "## 6." not in text
    # no part of the preset's base runs here: the head does not claim its settings or seeds, the sections state theirs
    head = text[:text.index("## 9.")]
    assert "Settings of every run" not in head and "seeds**" not in head and "Each section states its settings" in head
    for setting in ("synthetic", "base"):
        for arm in ss.ARMS:
            assert (report.parent / "results" / f"systems-{setting}-{arm}" / "accuracy_time.png").stat().st_size > 0
        assert not (runs / f"systems-{setting}" / "fedbuff" / "florana").exists()
        cfg = json.loads((runs / f"systems-{setting}" / "deadline" / "fedit" / "seed-0" / "config.json").read_text())
        assert cfg["deadline"] > 0 and cfg["over_select"] > 1 and cfg["devices"] == "default"
    # a number of the table is the run's: fedit-sync's final accuracy on the synthetic task (one seed: the value)
    final = json.loads((runs / "systems-synthetic" / "sync" / "fedit" / "seed-0" / "metrics.jsonl").read_text().splitlines()[-1])
    section = text[text.index("### synthetic:"):text.index("### base:")]
    row = re.search(r"^\| fedit \| sync \| 1 \| ([0-9.]+)", section, re.M)
    assert float(row.group(1)) == pytest.approx(final["global_accuracy"], abs=5e-4)
    assert "| florana | fedbuff | — | synchronous only |" in section
