"""Comparisons over paired seeds: intervals against scipy, paired differences per seed, the seeded compare table."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import tiny_config
from fedlora.app.experiment import build
from fedlora.app.stats import distinguishable, interval, paired, parse_seeds
from fedlora.cli.main import main
from test_cli import TINY


def test_interval_matches_scipy():
    x = [0.61, 0.58, 0.64, 0.57, 0.66]
    mean, half = interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=sum(x) / len(x), scale=stats.sem(x))
    assert mean == pytest.approx((lo + hi) / 2, abs=1e-12) and half == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert interval([0.5])[0] == 0.5 and math.isnan(interval([0.5])[1])
    assert interval([0.5, None, float("nan"), 0.7])[0] == pytest.approx(0.6)  # missing values are left out


def test_paired_differences_are_per_seed_not_from_the_means():
    ref = [0.50, 0.60, 0.70, 0.55]  # seeds differ a lot ...
    method = [r + 0.01 for r in ref]  # ... but the method is 0.01 better on every one
    mean, half = paired(method, ref)
    assert mean == pytest.approx(0.01) and half == pytest.approx(0.0, abs=1e-12) and distinguishable(mean, half)
    # unpaired, the intervals of the two means overlap widely: comparing means would call them equal
    (m1, h1), (m2, h2) = interval(method), interval(ref)
    assert m1 - h1 < m2 + h2
    mean, half = paired([0.6, 0.5, 0.7], [0.5, 0.6, 0.65])
    assert not distinguishable(mean, half)
    with pytest.raises(ValueError, match="one value per seed"):
        paired([0.1, 0.2], [0.1])


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7, 9") == [4, 7, 9]
    for bad in ("0", "a,b", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_same_seed_gives_every_method_the_same_partition_and_initial_adapter(small_csv):
    a, b = (build(tiny_config(small_csv, method=m, seed=3)).simulator for m in ("fedit", "ffa"))
    for ca, cb in zip(a.clients, b.clients):
        assert torch.equal(ca.train.input_ids, cb.train.input_ids) and torch.equal(ca.train.labels, cb.train.labels)
        assert torch.equal(ca.test.labels, cb.test.labels)
    assert all(torch.equal(a.global_tensors[n], b.global_tensors[n]) for n in a.global_tensors)
    c = build(tiny_config(small_csv, method="fedit", seed=4)).simulator
    assert not all(torch.equal(x.train.labels, y.train.labels) for x, y in zip(a.clients, c.clients))


def test_compare_over_paired_seeds(small_csv, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "--rounds", "1", "--data", str(small_csv), "--methods", "fedit,ffa", "--seeds", "2", "--out", str(out)]
    assert main(args) == 0
    table = (out / "comparison.md").read_text()
    assert "Seeds 0, 1: mean ± half-width of the 95 % t-interval over 2 paired seeds" in table
    assert "Paired difference to `fedit`" in table and "| ffa |" in table and "±" in table
    assert "Majority-class rate of the global test set" in table
    for m in ("fedit", "ffa"):
        for s in (0, 1):
            assert json.loads((out / m / f"seed-{s}" / "config.json").read_text())["seed"] == s
    assert (out / "accuracy.png").stat().st_size > 1000
    # Run again: everything is read back, the table is the same.
    assert main(args) == 0
    assert (out / "comparison.md").read_text() == table


def _without_wall_time(table: str) -> list[list[str]]:
    """The comparison table's rows with the wall-time column dropped (the one thing an interruption changes)."""
    rows = []
    for line in table.splitlines():
        if line.startswith("| ") and "|" in line[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append([c for i, c in enumerate(cells) if i != 7])  # | method | 4 accuracy/ρ columns | MB up | MB down | wall s |
    return rows


def test_compare_interrupted_after_its_first_method_finishes_with_the_same_table(small_csv, tmp_path, monkeypatch):
    from fedlora.federation.simulator import Simulator

    args = lambda out: ["compare", *TINY, "--rounds", "2", "--data", str(small_csv), "--methods", "fedit,ffa", "--out", str(out)]  # noqa: E731
    assert main(args(tmp_path / "whole")) == 0
    whole = (tmp_path / "whole" / "comparison.md").read_text()

    real_round = Simulator.round

    def interrupted(self, rnd):  # Ctrl-C during ffa's second round: fedit finished, ffa has a checkpoint of round 1
        if self.method.name == "ffa" and rnd == 2:
            raise KeyboardInterrupt
        return real_round(self, rnd)

    monkeypatch.setattr(Simulator, "round", interrupted)
    assert main(args(tmp_path / "cut")) != 0
    monkeypatch.setattr(Simulator, "round", real_round)
    assert main(args(tmp_path / "cut")) == 0  # the same command again: fedit read back, ffa resumed from round 1
    assert _without_wall_time((tmp_path / "cut" / "comparison.md").read_text()) == _without_wall_time(whole)


def test_seeded_table_marks_did_not_learn_when_the_interval_does_not_clear_the_majority_rate():
    """† follows the interval, not the mean: a mean above the rate whose interval reaches down to it is not shown to
    have learned; one clear of it by more than its half-width is not marked."""
    from fedlora.app.report import seeded_tables

    def rows(accs):
        return [{"global_accuracy": a, "local_accuracy": a, "gap": 0.0, "divergence": 0.0, "mb_up": 1.0, "mb_down": 1.0,
                 "wall_seconds": 1.0} for a in accs]

    text = seeded_tables({"fedit": rows([0.30, 0.25, 0.50]), "ffa": rows([0.80, 0.82, 0.84])}, [0, 1, 2], None, [0.25] * 3)
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| f")}
    assert "†" in line["fedit"]  # mean 0.35 > 0.26, but the interval (t = 4.30, n = 3) reaches below it
    assert "†" not in line["ffa"]
    one = seeded_tables({"fedit": rows([0.30])}, [0], None, [0.25])
    assert "†" not in next(ln for ln in one.splitlines() if ln.startswith("| fedit"))  # one seed: its value clears 0.26


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fedit", "flora", "florist", "hetlora", "fedrot", "x"]),
                          st.floats(0, 40), st.floats(0, 40)), min_size=1, max_size=14))
def test_tradeoff_labels_never_overlap_even_in_a_tight_cluster(points):
    """The tradeoff figure's labels (offsets in points from each point): no two label boxes overlap, however the points
    crowd (14 points in a 40×40-point square is denser than any figure draws)."""
    from fedlora.app.report import label_offsets

    h, w = 7 * 1.25, 7 * 0.6
    offsets = label_offsets(points, fontsize=7)
    boxes = [(x + dx, y + dy, x + dx + w * len(n), y + dy + h) for (n, x, y), (dx, dy) in zip(points, offsets)]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    if len(points) == 1:
        assert offsets == [(4.0, 3.0)]  # alone, a label sits just right of and above its point
