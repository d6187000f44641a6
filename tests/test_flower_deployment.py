"""A Flower deployment on loopback: SuperLink + 2 SuperNodes with TLS and SuperNode authentication, one round.

The run gives `fedlora run`'s numbers, a SuperNode whose key was never registered is refused, and no process the
federation started (SuperLink, SuperNodes, their SuperExecs, ServerApp and ClientApp processes) is left behind.
"""

import dataclasses
import json

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.flower.config import to_toml  # noqa: E402
from fedlora.flower.loopback import LoopbackFederation, family, write_node_key  # noqa: E402
from fedlora.frontend.experiment import run_experiment  # noqa: E402
from test_flower_simulation import ROOT  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # see conftest.one_thread; real Flower processes


def test_loopback_deployment_with_tls_and_supernode_auth(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="florana", clients=2, rounds=1)
    fed = LoopbackFederation(tmp_path / "federation", supernodes=2, env={"OMP_NUM_THREADS": "1"})
    assert fed.environ["FLWR_HOME"].startswith(str(tmp_path))
    assert fed.environ["FLWR_TELEMETRY_ENABLED"] == "0" and fed.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    try:
        fed.start()
        # TLS: the SuperLink serves only HTTPS with our CA's certificate; a client that does not trust it fails.
        import ssl

        import httpx

        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{fed.port}/health", timeout=5)
        trusted = ssl.create_default_context(cafile=str(fed.certs.ca))
        assert httpx.get(f"https://127.0.0.1:{fed.port}/health", timeout=5, verify=trusted).status_code < 500

        # Authentication: a SuperNode with a key that was never registered is refused and gives up.
        private, _ = write_node_key(fed.workdir / "keys", "unregistered")
        intruder = fed.start_supernode(0, private, name="unregistered", extra=["--max-retries", "2", "--max-wait-time", "30"])
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (fed.logs / "unregistered.log").read_text()

        overrides = tmp_path / "run-config.toml"
        overrides.write_text(to_toml(dataclasses.replace(cfg, out=str(tmp_path / "flower"))))
        res = fed.run(ROOT, str(overrides), timeout=900)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        nodes = fed.flwr("supernode", "list", "loopback", "--format", "json")
        assert nodes.returncode == 0, nodes.stderr
        assert len(json.loads(nodes.stdout)["nodes"]) == 2  # only the registered SuperNodes ever joined
    finally:
        started = family([p.pid for p in fed.processes.values()])
        left = fed.stop()
    assert len(started) >= 5  # SuperLink, 2 SuperNodes and the SuperExecs they started, at least
    assert not left and not family(sorted(started)), "a process of the federation survived its teardown"

    run_experiment(dataclasses.replace(cfg, out=str(tmp_path / "inprocess")))
    got = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == 1
    for key in ("clients", "divergence", "divergence_per_layer", "bound", "bytes_up", "bytes_down"):
        assert got[0][key] == want[0][key], key
    for key in ("global_accuracy", "local_accuracy", "train_loss"):
        assert abs(got[0][key] - want[0][key]) <= 1e-4, key
    supernodes = json.loads((tmp_path / "flower" / "flower.json").read_text())["supernodes"]
    assert sorted(supernodes) == ["0", "1"]

