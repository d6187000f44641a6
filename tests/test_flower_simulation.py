"""`flwr run . local`: Flower's simulation runtime (local SuperLink, Ray), tiny model, 2 SuperNodes, 2 rounds.

The run directory's metrics must equal `fedlora run`'s for the same settings and seed: divergence and bytes exactly,
accuracy within 1e-4. Flower runs with FLWR_HOME in a temporary folder, telemetry and runtime dependency
installation off, and its local SuperLink on free ports; every process it started is ended at the end (by id).
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.app.experiment import run_experiment  # noqa: E402
from fedlora.flower.config import to_toml  # noqa: E402
from fedlora.flower.loopback import FLOWER_ENV, family, free_port, terminate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # see conftest.one_thread; real Flower processes


def flower_environment(home: Path) -> dict[str, str]:
    env = os.environ | FLOWER_ENV | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
        # a private local SuperLink: never one another user or test started on the default ports
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    return env


def processes_using(path: Path) -> set[int]:
    """Processes whose command line names ``path`` (our FLWR_HOME): the local SuperLink `flwr run` started."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if str(path) in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    env = flower_environment(home)
    runs = []
    yield env, runs
    started = family(sorted(processes_using(home)))
    if runs:  # `flwr run` started a local SuperLink; this teardown must find it, or it checks nothing
        assert started, "found no process of the local SuperLink to stop"
    left = terminate(started)
    assert not left, f"processes {sorted(left)} of the local SuperLink survived"
    assert not family(sorted(started)), "a process of the simulation outlived the local SuperLink"


def flwr_run(flower, cfg, tmp_path: Path, name: str) -> str:
    """`flwr run . local` of ``cfg`` with one simulated SuperNode per client; returns its log, having checked that it
    finished and wrote the run directory."""
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(to_toml(cfg))
    env, runs = flower
    runs.append(name)
    res = subprocess.run(
        ["flwr", "run", ".", "local", "--run-config", str(overrides), "--federation-config", f"num-supernodes={cfg.clients}", "--stream"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert (Path(cfg.out) / "metrics.jsonl").exists(), log[-4000:]
    return log


@pytest.mark.parametrize("method", ["fedsa", "fedex"])  # florana: through the in-process grid (test_flower.py)
def test_flower_simulation_writes_fedlora_runs_numbers(flower, small_csv, tmp_path, method):
    cfg = tiny_config(small_csv, method=method, clients=2, rounds=2)
    flower_out, ref_out = tmp_path / "flower", tmp_path / "inprocess"
    log = flwr_run(flower, cfg.replace(out=str(flower_out)), tmp_path, method)

    run_experiment(cfg.replace(out=str(ref_out)))
    got = [json.loads(x) for x in (flower_out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [g["round"] for g in got] == [1, 2] and len(want) == 2
    for g, w in zip(got, want):
        assert g["clients"] == w["clients"] == [0, 1]
        for key in ("divergence", "divergence_per_layer", "bound", "bytes_up", "bytes_down"):
            assert g[key] == w[key], (method, g["round"], key, g[key], w[key])
        for key in ("global_accuracy", "local_accuracy", "train_loss"):
            assert abs(g[key] - w[key]) <= 1e-4, (method, g["round"], key, g[key], w[key])
        assert set(g) == set(w)
    if method != "fedsa":
        assert got[0]["divergence"] is not None

    # the same run directory as `fedlora run`, plus flower.json; config.json differs only in `out`
    names = {p.relative_to(flower_out).as_posix() for p in flower_out.rglob("*") if p.is_file()}
    ref_names = {p.relative_to(ref_out).as_posix() for p in ref_out.rglob("*") if p.is_file()}
    assert ref_names - names <= {"checkpoint.safetensors"} | {n for n in ref_names if n.startswith("private/")}, ref_names - names
    config = json.loads((flower_out / "config.json").read_text())
    assert config | {"out": None} == json.loads((ref_out / "config.json").read_text()) | {"out": None}
    assert (flower_out / "summary.md").read_text().startswith("# fedlora run")
    assert re.search(r"Federation .* \(2 simulated SuperNodes\)", log)


def test_flower_simulation_with_secure_aggregation(flower, small_csv, tmp_path):
    """SecAgg+ in Flower's own runtime (Ray, 3 SuperNodes): the run finishes, every round is securely aggregated
    with every client in the sum, and its scores stay within the quantisation's reach of the plain run's."""
    cfg = tiny_config(small_csv, method="fedit", clients=3, rounds=2)
    flower_out, ref_out = tmp_path / "flower", tmp_path / "inprocess"
    log = flwr_run(flower, cfg.replace(secure_aggregation=True, out=str(flower_out)), tmp_path, "secure")
    assert "Secure aggregation completed" in log
    run_experiment(cfg.replace(out=str(ref_out)))
    got = [json.loads(x) for x in (flower_out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    for g, w in zip(got, want, strict=True):
        assert g["secure_aggregation"] is True and g["clients"] == w["clients"] == [0, 1, 2] and g["n_rejected"] == 0
        assert g["divergence"] is None and w["divergence"] is not None  # the server cannot measure what it cannot see
        assert g["bytes_up"] > w["bytes_up"]
        for key in ("global_accuracy", "local_accuracy"):
            assert abs(g[key] - w[key]) <= 0.1, (g["round"], key, g[key], w[key])
