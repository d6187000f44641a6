"""A Flower deployment on loopback: SuperLink + 2 SuperNodes with TLS and SuperNode authentication, one round.

The run gives `fedlora run`'s numbers, a SuperNode whose key was never registered is refused, and no process the
federation started (SuperLink, SuperNodes, their SuperExecs, ServerApp and ClientApp processes) is left behind.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.flower.config import to_toml  # noqa: E402
from fedlora.flower.loopback import LoopbackFederation, family, write_node_key  # noqa: E402
from fedlora.frontend.experiment import run_experiment  # noqa: E402
from test_flower_simulation import ROOT  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # see conftest.one_thread; real Flower processes


@contextlib.contextmanager
def intruder_namespace():
    """A network namespace joined to this host by a veth pair: the host side is the SuperNodes' network address
    (10.231.0.1), the namespace (10.231.0.2) is an attacker on that network and nowhere else."""
    name = f"fli{os.getpid() % 100000}"
    host_if, ns_if = f"{name}h", f"{name}n"

    def ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True)

    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"network namespaces are not available here ({exc}); the intruder test needs CAP_NET_ADMIN")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", "10.231.0.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", "10.231.0.2/30", "dev", ns_if, ns=name)
        ip("link", "set", ns_if, "up", ns=name)
        ip("link", "set", "lo", "up", ns=name)
        yield name, "10.231.0.1"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_namespace(ns: str, env: dict, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *command], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_loopback_deployment_with_tls_and_supernode_auth(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="florana", clients=2, rounds=1)
    with intruder_namespace() as (ns, address):
        _deployment(cfg, tmp_path, ns, address)


def _deployment(cfg, tmp_path, ns, address):
    fed = LoopbackFederation(tmp_path / "federation", supernodes=2, env={"OMP_NUM_THREADS": "1"}, gateway=address)
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

        # The intruder: on the SuperNodes' network with the public ca.crt, nothing else. The SuperNodes reach the
        # SuperLink through the gateway; the intruder can neither register a key of its own nor start a run there,
        # and the SuperLink's own port is not on that network at all.
        home = tmp_path / "intruder-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "intruder"\n\n[superlink.intruder]\naddress = "{address}:{fed.gateway_port}"\n'
            f'root-certificates = "{fed.certs.ca}"\n')
        env = fed.environ | {"FLWR_HOME": str(home)}
        _, public = write_node_key(tmp_path / "intruder-keys", "intruder")
        reg = in_namespace(ns, env, "flwr", "supernode", "register", str(public), "intruder")
        assert reg.returncode != 0, reg.stdout + reg.stderr
        run = in_namespace(ns, env, "flwr", "run", str(ROOT), "intruder", "--run-config", str(overrides))
        assert run.returncode != 0, run.stdout + run.stderr
        probe = "import socket,sys; s=socket.socket(); s.settimeout(5); sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
        assert in_namespace(ns, env, sys.executable, "-c", probe, address, str(fed.port)).returncode != 0  # SuperLink: 127.0.0.1 only
        assert in_namespace(ns, env, sys.executable, "-c", probe, address, str(fed.gateway_port)).returncode == 0  # the gateway: yes
        nodes = fed.flwr("supernode", "list", "loopback", "--format", "json")
        assert len(json.loads(nodes.stdout)["nodes"]) == 2  # the intruder's key never got in
        refusals = (fed.logs / "gateway.log").read_text()
        assert "refused POST /v1/control/" in refusals and "from 10.231.0.2" in refusals  # it got there, and no further
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

