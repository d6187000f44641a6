"""A Flower deployment on loopback: SuperLink + 2 SuperNodes with TLS and SuperNode authentication.

The runs give `fedlora run`'s numbers (a classifier with florana; a tiny Llama instruction-tuned with FedSA, its
private B exported from the SuperNodes' state directories), a SuperNode whose key was never registered is refused,
the intruder on the SuperNodes' network can neither register nor run, and no process the federation started
(SuperLink, SuperNodes, their SuperExecs, ServerApp and ClientApp processes) is left behind. A second deployment
survives killed SuperNodes, a fresh one, and a killed ServerApp. A third runs FedAsync with one SuperNode slowed on
purpose (node config reply-delay): the fast clients' updates are applied while it trains, and it lands stale.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.app.experiment import run_experiment  # noqa: E402
from fedlora.flower.config import to_toml  # noqa: E402
from fedlora.flower.loopback import LoopbackFederation, family, write_node_key  # noqa: E402
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
        _deployment(cfg, tmp_path, ns, address, small_csv)


def _deployment(cfg, tmp_path, ns, address, small_csv):
    fed = LoopbackFederation(tmp_path / "federation", supernodes=2, env={"OMP_NUM_THREADS": "1"}, gateway=address, state_dirs=True)
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
        overrides.write_text(to_toml(cfg.replace(out=str(tmp_path / "flower"))))
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

        # Generative: instruction tuning of a tiny Llama with FedSA on the same SuperNodes (their ClientApp processes
        # build the causal LM); its private B stays in their state directories until exported on request.
        lm_cfg, lm_out = _causal_lm_run(fed, small_csv, tmp_path)
    finally:
        started = family([p.pid for p in fed.processes.values()])
        left = fed.stop()
    assert len(started) >= 5  # SuperLink, 2 SuperNodes and the SuperExecs they started, at least
    assert not left and not family(sorted(started)), "a process of the federation survived its teardown"
    _check_causal_lm_run(fed, lm_cfg, lm_out, tmp_path)

    run_experiment(cfg.replace(out=str(tmp_path / "inprocess")))
    got = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == 1
    for key in ("clients", "divergence", "divergence_per_layer", "bound", "bytes_up", "bytes_down"):
        assert got[0][key] == want[0][key], key
    for key in ("global_accuracy", "local_accuracy", "train_loss"):
        assert abs(got[0][key] - want[0][key]) <= 1e-4, key
    supernodes = json.loads((tmp_path / "flower" / "flower.json").read_text())["supernodes"]
    assert sorted(supernodes) == ["0", "1"]



def _causal_lm_run(fed, small_csv, tmp_path):
    import pandas as pd

    from test_causal_lm import tiny_lm_config

    data = tmp_path / "instr.jsonl"
    frame = pd.read_csv(small_csv).groupby("label").head(20)
    data.write_text("".join(json.dumps({"prompt": f"Sentiment of: {t[:80]}", "response": lab, "label": lab}) + "\n"
                            for t, lab in zip(frame["text"], frame["label"])))
    cfg = tiny_lm_config(data, method="fedsa", rounds=2)
    out = tmp_path / "flower-lm"
    overrides = tmp_path / "run-config-lm.toml"
    overrides.write_text(to_toml(cfg.replace(out=str(out))))
    res = fed.run(ROOT, str(overrides), timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return cfg, out


def _check_causal_lm_run(fed, cfg, out, tmp_path):
    """The Flower run equals `fedlora run`, and `fedlora export-private` brings each client's B out of its SuperNode's
    state directory into the layout `fedlora run` writes, equal to it."""
    import torch
    from safetensors.torch import load_file

    from fedlora.cli.main import main

    run_experiment(cfg.replace(out=str(tmp_path / "inprocess-lm")))
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "inprocess-lm" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        for key in ("clients", "bytes_up", "bytes_down"):
            assert g[key] == w[key], key
        for key in ("global_accuracy", "local_accuracy", "train_loss"):
            assert abs(g[key] - w[key]) <= 1e-4, key
    assert not (out / "private").exists()  # nothing private reached the server
    for i in range(cfg.clients):
        assert main(["export-private", str(out), "--state-dir", str(fed.workdir / "state" / f"supernode-{i}")]) == 0
        a = load_file(str(out / "private" / f"client_{i}.safetensors"))
        b = load_file(str(tmp_path / "inprocess-lm" / "private" / f"client_{i}.safetensors"))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _kill_family(pids: list[int]) -> None:
    for pid in family(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_lines(path, n: int, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"flwr run ended early (code {proc.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout:.0f}s")


def test_deployment_survives_killed_supernodes_a_fresh_one_and_a_killed_serverapp(small_csv, tmp_path):
    """Real SuperLink and SuperNodes (TLS, auth, a state directory and a model worker each), fedsa, 4 rounds.

    As round 2 starts, SuperNodes 1 and 2 are killed -9: round 2 finishes with client 0 after round-timeout and records
    both misses. SuperNode 2's state directory is deleted and a fresh SuperNode with a key of its own is registered
    and started for partition 2: it waits on standby while the SuperLink still lists the dead one, takes partition 2
    at round 3 (the dead one was silent) and is sent what it missed (catch-up bytes). The ServerApp is killed -9 after
    round 3; SuperNode 1 is restarted (same key, same state directory) and the run resumed (resume=true: a new run id,
    so every client's state comes back from its state directory, client 1's B from before the kill). Every round's
    numbers equal an in-process replay of the same events."""
    import shutil

    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation

    cfg = tiny_config(small_csv, method="fedsa", clients=3, rounds=4)
    out = tmp_path / "flower"
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(to_toml(cfg.replace(out=str(out))) + "round-timeout = 25.0\n")
    # model workers (separate processes: a SuperNode's kill leaves its worker, as a service beside it would be)
    fed = LoopbackFederation(tmp_path / "federation", supernodes=3, env={"OMP_NUM_THREADS": "1"}, state_dirs=True, workers=True)
    try:
        fed.start()
        listed = fed.flwr("supernode", "list", "loopback", "--format", "json").stdout
        old_nodes = {int(n["node-id"]) for n in json.loads(listed)["nodes"]}
        log = open(tmp_path / "run.log", "w")
        run = subprocess.Popen(["flwr", "run", str(ROOT), "loopback", "--run-config", str(overrides), "--stream"],
                               env=fed.environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
        _wait_lines(out / "metrics.jsonl", 1, run)
        _kill_family([fed.processes["supernode-1"].pid, fed.processes["supernode-2"].pid])  # kill -9, with their SuperExecs
        shutil.rmtree(fed.workdir / "state" / "supernode-2")  # partition 2's state is gone with its machine
        private, public = write_node_key(fed.workdir / "keys", "supernode-2-fresh")
        fed.register(public)
        fed.start_supernode(2, private, name="supernode-2-fresh")
        _wait_lines(out / "metrics.jsonl", 3, run, timeout=300)
        serverapps = [p for p in family([fed.processes["superlink"].pid]) if b"flwr-serverapp" in _cmdline(p)]
        assert serverapps, "no ServerApp process found"
        _kill_family(serverapps)
        _kill_family([run.pid])
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 and not (out / "summary.md").exists()
        # The SuperLink holds a killed SuperNode online for 2 heartbeats (60 s): restart it until it is let back in.
        _restart_supernode(fed, 1)
        again = tmp_path / "resume.toml"
        again.write_text(overrides.read_text() + "resume = true\n")
        resumed = fed.flwr("run", str(ROOT), "loopback", "--run-config", str(again), "--stream", timeout=900, cwd=ROOT)
        (tmp_path / "resume.log").write_text(resumed.stdout + resumed.stderr)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    finally:
        left = fed.stop()
    assert not left
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [g["round"] for g in got] == [1, 2, 3, 4] and (out / "summary.md").exists(), (tmp_path / "resume.log").read_text()[-3000:]
    assert got[1]["clients"] == [0] and [r["client"] for r in got[1]["rejected"]] == [1, 2]
    assert all("no reply" in r["reason"] for r in got[1]["rejected"])
    assert got[2]["clients"] == [0, 2] and got[2]["catch_up_bytes"] > 0  # the fresh SuperNode is sent rounds 1 and 2
    assert [r["client"] for r in got[2]["rejected"]] == [1] and "no reply" in got[2]["rejected"][0]["reason"]
    assert got[3]["clients"] == [0, 1, 2] and got[3]["catch_up_bytes"] > 0  # client 1 is sent rounds 1 to 3
    nodes = json.loads((out / "flower.json").read_text())["supernodes"]
    assert nodes["2"] not in old_nodes and {nodes["0"], nodes["1"]} <= old_nodes  # a restart keeps its key, hence its node id

    # the same events in process: SuperNodes 1 and 2 lost after round 1, a fresh one for partition 2, a resume
    nodes_dir = tmp_path / "replay-nodes"

    class Replay(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "1" for m in messages):
                self.kill_supernode(501)
                self.kill_supernode(502)
                shutil.rmtree(nodes_dir / "supernode-2")
                self.start_supernode(602, 2)
            return replies

    replay_out = cfg.replace(out=str(tmp_path / "replay"))
    run_federation(Replay(cfg.replace(rounds=3), fresh=True, state_dir=nodes_dir), replay_out.replace(rounds=3))
    replay = run_federation(InlineGrid(cfg, fresh=True, state_dir=nodes_dir), replay_out, resume=True)
    for g, r in zip(got, replay, strict=True):
        for key in ("clients", "divergence", "divergence_per_layer", "bytes_up", "bytes_down", "catch_up_bytes"):
            assert g[key] == r[key], (g["round"], key, g[key], r[key])
        for key in ("global_accuracy", "local_accuracy", "train_loss"):
            assert abs(g[key] - r[key]) <= 1e-4, (g["round"], key)


def _restart_supernode(fed, partition: int, deadline_s: float = 240) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        proc = fed.start_supernode(partition, fed.node_keys[partition][0])
        try:
            proc.wait(timeout=20)  # exits (code 305) while the SuperLink still holds the killed one online
        except subprocess.TimeoutExpired:
            return  # up and activated
        time.sleep(5)
    raise AssertionError(f"SuperNode {partition} was not let back in within {deadline_s:.0f}s")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_async_deployment_applies_the_fast_clients_while_a_slow_supernode_trains(small_csv, tmp_path):
    """FedAsync on a real SuperLink and SuperNodes (fedlora.flower.asynchronous). SuperNode 2 waits 20 s before it
    replies (node config reply-delay): while it is in flight the fast clients' updates are applied one version each,
    and its own update lands stale, mixed with α·h(τ) < α."""
    cfg = tiny_config(small_csv, method="fedit", clients=3, rounds=2, async_mode="fedasync")
    out = tmp_path / "flower"
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(to_toml(cfg.replace(out=str(out))) + "round-timeout = 300.0\n")
    fed = LoopbackFederation(tmp_path / "federation", supernodes=3, env={"OMP_NUM_THREADS": "1"}, node_extra={2: "reply-delay=20.0"})
    try:
        fed.start()
        res = fed.run(ROOT, str(overrides), timeout=900)
        assert fed.outcome(res) == (0, ""), (res.stdout + res.stderr)[-4000:]
    finally:
        left = fed.stop()
    assert not left
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in lines] == [1, 2, 3, 4, 5, 6] and [m["arrivals"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(len(m["clients"]) == 1 and len(m["arrived_at"]) == 1 for m in lines)  # FedAsync: a version per arrival
    slow = next(i for i, m in enumerate(lines) if m["clients"] == [2])
    assert slow >= 1 and all(m["clients"] != [2] for m in lines[:slow])  # versions the fast clients made meanwhile
    assert lines[slow]["staleness"] == [slow] and lines[slow]["alpha"] < cfg.fedasync_alpha  # it started from version 0
    assert lines[slow]["clock_seconds"] >= 20.0 and "sim_clock" not in lines[slow]
    assert [m["clock_seconds"] for m in lines] == sorted(m["clock_seconds"] for m in lines)
    assert (out / "summary.md").exists() and json.loads((out / "config.json").read_text())["async_mode"] == "fedasync"
