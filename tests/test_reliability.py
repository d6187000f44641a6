"""Faults injected for real: bad uploads, failing clients, a killed run resumed, bad input, no pickle."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fedlora.app.experiment import build
from fedlora.federation.simulator import client_turn, client_weights


def corrupt(kind):
    """A client wrapper: client 1 trains normally, then its upload is damaged in the named way."""

    def turn(h, method, task, client, start, cfg, rnd):
        r = client_turn(h, method, task, client, start, cfg, rnd)
        if client.cid != 1:
            return r
        name = next(iter(r.upload))
        if kind == "nan":
            r.upload[name] = r.upload[name].clone().fill_(float("nan"))
        elif kind == "inf":
            r.upload[name] = r.upload[name].clone().fill_(float("inf"))
        elif kind == "missing":
            del r.upload[name]
        elif kind == "extra":
            r.upload["bert.pooler.dense.weight"] = torch.zeros(3)
        elif kind == "shape":
            r.upload[name] = r.upload[name][..., :1].clone()
        elif kind == "dtype":
            r.upload[name] = r.upload[name].double()
        elif kind == "norm":
            r.upload = {n: t * 1e4 for n, t in r.upload.items()}
        elif kind == "huge":  # finite, but its products would overflow float32 in any rule (caught before norm screening)
            r.upload[name] = r.upload[name].clone().fill_(3e18)
        elif kind == "raise":
            raise RuntimeError("disk full on client 1")
        return r

    return turn


@pytest.mark.parametrize("kind,needle", [
    ("nan", "NaN or Inf"), ("inf", "NaN or Inf"), ("missing", "lacks"), ("extra", "unexpected"),
    ("shape", "shape"), ("dtype", "dtype"), ("norm", "median"), ("raise", "raised RuntimeError"),
    ("huge", "would overflow float32"),
])
def test_bad_client_is_rejected_and_the_round_goes_on(small_csv, kind, needle, caplog):
    exp = build(tiny_config(small_csv, method="florana", rounds=2))
    sim = exp.simulator
    sim.turn = corrupt(kind)
    with caplog.at_level("WARNING", logger="fedlora"):
        history = sim.run()
    for m in history:
        assert m["clients"] == [0, 2] and m["n_rejected"] == 1 and not m["skipped"]
        assert m["rejected"][0]["client"] == 1 and needle in m["rejected"][0]["reason"]
        assert m["divergence"] is not None and m["divergence"] == m["divergence"]  # finite, not NaN
    assert all(torch.isfinite(t).all() for t in sim.global_tensors.values())
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2 and all("client 1" in l and "\n" not in l for l in lines)


def test_rejected_client_leaves_the_aggregate_of_the_others_with_renormalised_weights(small_csv):
    exp = build(tiny_config(small_csv, method="fedit", rounds=1))
    sim, h, cfg = exp.simulator, exp.simulator.handle, exp.simulator.config
    results = [client_turn(h, sim.method, sim.task, c, sim.global_tensors, cfg, 1) for c in sim.clients]
    results[1].upload = {n: t.clone().fill_(float("nan")) for n, t in results[1].upload.items()}
    update, accepted, metrics = sim.close_round(results, [], 1, 0.0)
    assert [r.cid for r in accepted] == [0, 2]
    w = client_weights([results[0].n_train, results[2].n_train], "examples")
    name = h.B_names()[0]
    expected = w[0].float() * results[0].upload[name] + w[1].float() * results[2].upload[name]
    torch.testing.assert_close(update.broadcast[name], expected, rtol=1e-5, atol=1e-7)


def test_no_client_left_skips_the_round_and_keeps_the_global_state(small_csv):
    exp = build(tiny_config(small_csv, method="fedex", rounds=1))
    sim, h = exp.simulator, exp.simulator.handle
    before = {n: t.clone() for n, t in sim.global_tensors.items()}
    base_before = {m: l.get_base_layer().weight.detach().clone() for m, l in h.layers.items()}

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    sim.turn = broken
    m = sim.round(1)
    assert m["skipped"] and m["n_rejected"] == 3 and m["clients"] == [] and m["bytes_down"] == 0
    assert all(torch.equal(before[n], sim.global_tensors[n]) for n in before)
    assert all(torch.equal(base_before[k], l.get_base_layer().weight) for k, l in h.layers.items())


def _numbers(rows):
    skip = {"wall_seconds", "aggregation_seconds"}
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(_numbers(a), _numbers(b)):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-9), k
            elif isinstance(x[k], dict):
                for kk in x[k]:
                    assert y[k][kk] == pytest.approx(x[k][kk], rel=1e-6, abs=1e-9), (k, kk)
            else:
                assert x[k] == y[k], k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedex", "fedsa"])
def test_killed_run_resumes_to_the_same_metrics(small_csv, tmp_path, method):
    args = ["--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "3", "--local-steps", "2",
            "--batch-size", "8", "--rank", "4", "--examples-per-client", "40", "--test-examples", "60",
            "--max-length", "32", "--partition", "iid", "--method", method, "--quiet"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-m", "fedlora.cli.main", "run", *args, "--out", str(full)], check=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli.main", "run", *args, "--out", str(killed)], env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill right after round 1's checkpoint lands
            if (killed / "checkpoint.safetensors").exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < 3, "the kill should land before the run finished"

    res = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "run", "--resume", str(killed), "--quiet"], env=env, timeout=600,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    _assert_same(a, b)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "fedit"}))
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli.main", "run", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no checkpoint.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_nothing_unpickles():
    src = Path(__file__).resolve().parents[1] / "src"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.loads?\(", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
