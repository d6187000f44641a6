"""`scripts/flower_deploy.sh` as a user runs it, and the ServerApp's refusals in one line.

The script is run as a real process: a bad setting is one line and exit 2 before anything starts; a deployment killed
with kill -9 after round 2 of 4 takes its processes with it; the same command again is refused (the run directory
holds a run: exit 2 with the ServerApp's reason in one line, nothing changed); the same command with resume=true
finishes the run, and every round equals `fedlora run`'s.
"""

import json
import os
import signal
import subprocess
import time
import traceback

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.flower.config import FLOWER_ONLY, flower_options, from_flower  # noqa: E402
from fedlora.flower.loopback import _parse, family, run_config_toml  # noqa: E402
from test_flower_simulation import ROOT  # noqa: E402

SCRIPT = ROOT / "scripts" / "flower_deploy.sh"


def script(*args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **popen)


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("flower_deploy: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow  # a real process: imports torch, transformers and Flower (~5 s; 20 s on a busy machine)
def test_the_script_refuses_a_bad_setting_in_one_line_before_starting_anything(tmp_path):
    work = tmp_path / "work"
    res = script("--workdir", str(work), "--run-config", "rank=0 method='fedsa'")
    assert res.returncode == 2 and "rank r=0 is below 1" in one_line(res.stderr)
    assert not work.exists()  # nothing started, nothing written


@pytest.mark.parametrize("run_config, needle", [
    (["method='central'"], "method central runs in-process only"),
    (["method='local'"], "method local runs in-process only"),
    (["resume='yes'"], "resume='yes' has the wrong type"),
    (["resume=true"], "resume needs the run directory"),
    (["round-timeout=0"], "must be a positive number of seconds"),
    (["out=runs/x"], "is not valid TOML"),
    (["/no/such/run.toml"], "No such file"),
])
def test_settings_the_script_refuses_before_starting(run_config, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        _parse([arg for item in run_config for arg in ("--run-config", item)])
    assert stop.value.code == 2 and needle in one_line(capsys.readouterr().err)


def test_resume_and_round_timeout_reach_the_servers_run_config(tmp_path):
    """The launcher writes the run config `flwr run` gets: the Flower-only keys given stay in it (they were dropped,
    so a resume through the script was refused as "already holds a run")."""
    from flwr.common.config import parse_config_args

    toml = tmp_path / "run.toml"
    toml.write_text("method = 'fedsa'\nrounds = 4\n")
    args, config, options = _parse(["--run-config", str(toml), "--run-config", "out='/tmp/x' resume=true round-timeout=25"])
    assert options == {"resume": True, "round-timeout": 25.0} and config.method == "fedsa" and config.rounds == 4
    written = tmp_path / "run-config.toml"
    written.write_text(run_config_toml(config, options))
    server_sees = parse_config_args([str(written)])  # what the ServerApp's context.run_config is fused from
    assert flower_options(server_sees) == {"resume": True, "round-timeout": 25.0}
    assert from_flower(server_sees) == config
    _, _, none_given = _parse(["--run-config", "out='/tmp/x'"])
    assert none_given == {} and set(parse_config_args([str(written)])) & set(FLOWER_ONLY) == {"resume", "round-timeout"}


@pytest.mark.parametrize("run_config, needle", [
    ({"rank": 0}, "rank r=0 is below 1"),
    ({"method": "central"}, "method central runs in-process only"),
    ({"method": "local"}, "method local runs in-process only"),
    ({"resume": True}, "resume needs the run directory"),
    ({"bogus": 1}, "'bogus' is not a flag of `fedlora run`"),
])
def test_the_server_app_refuses_a_setting_in_one_line(run_config, needle):
    """What Flower logs of a ServerApp's exception (its traceback and message) is one line: `fedlora.RunRefused: …`,
    the line scripts/flower_deploy.sh reports."""
    from flwr.app import Context, RecordDict

    from fedlora.flower.server_app import RunRefused, main

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(RunRefused) as err:
        main(None, context)
    logged = "".join(traceback.format_exception(err.value)).strip()
    assert logged.startswith("fedlora.RunRefused: ") and "\n" not in logged and needle in logged, logged


def _wait_lines(path, n: int, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"the script ended early (code {proc.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {n} lines in {timeout:.0f}s")


def _wait_gone(pids: set[int], timeout: float = 90) -> set[int]:
    deadline = time.time() + timeout
    while True:
        left = {p for p in pids if _state(p) != "Z"}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def _state(pid: int) -> str:
    """A process's state letter; "Z" for a zombie or a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2]
    except (OSError, ValueError):
        return "Z"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_deployment_killed_after_round_2_resumes_through_the_script(small_csv, tmp_path):
    """fedsa, 2 SuperNodes (model workers, state directories), 4 rounds: kill -9 of the script after round 2 ends the
    whole deployment; the same command is refused in one line (exit 2, the run untouched); with resume=true it
    finishes, and every round equals `fedlora run`'s (the clients' B came back from their state directories)."""
    from fedlora.app.experiment import run_experiment

    cfg = tiny_config(small_csv, method="fedsa", clients=2, rounds=4)
    out, work = tmp_path / "flower", tmp_path / "work"
    settings = (f"method='fedsa' model='tiny:bert' data='{small_csv}' clients=2 rounds=4 local-steps=2 batch-size=8 rank=4 "
                f"examples-per-client=40 test-examples=60 max-length=32 partition='iid' seed=0 lr=0.005 device='cpu' out='{out}'")
    command = ["--supernodes", "2", "--workdir", str(work), "--run-config", settings]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(["bash", str(SCRIPT), *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    started: set[int] = set()
    try:
        _wait_lines(out / "metrics.jsonl", 2, first)
        started = family([first.pid]) - {first.pid}
        assert len(started) >= 5  # SuperLink, SuperNodes, workers, their SuperExecs, the ServerApp
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        left = _wait_gone(started)
        assert not left, f"processes {sorted(left)} outlived the killed script"
    finally:
        for pid in _wait_gone(started, timeout=0) if started else ():
            os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
    done = (out / "metrics.jsonl").read_text()
    assert 2 <= len(done.splitlines()) < 4 and not (out / "summary.md").exists()

    again = script(*command, timeout=600)
    reason = one_line(again.stderr)
    assert again.returncode == 2 and "already holds a run" in reason and "resume=true" in reason, again.stdout[-3000:]
    assert "Traceback" not in again.stdout and "fedlora.RunRefused: " in again.stdout  # the ServerApp's log: one line
    assert (out / "metrics.jsonl").read_text() == done

    resumed = script(*command[:-1], settings + " resume=true", timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "stopped every process it started" in resumed.stdout
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    run_experiment(cfg.replace(out=str(tmp_path / "inprocess")))
    want = [json.loads(x) for x in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert [g["round"] for g in got] == [1, 2, 3, 4] and (out / "summary.md").exists()
    for g, w in zip(got, want, strict=True):
        for key in ("clients", "bytes_up", "bytes_down", "divergence"):
            assert g[key] == w[key], (g["round"], key)
        for key in ("global_accuracy", "local_accuracy", "train_loss"):
            assert abs(g[key] - w[key]) <= 1e-4, (g["round"], key)


def test_a_failed_run_exits_non_zero_with_the_server_apps_reason(tmp_path):
    """The launcher's verdict on a finished `flwr run` (which itself exits 0 either way) comes from the SuperLink's
    status of the run: completed → 0; refused by fedlora → 2 with its line; any other failure → 1 with Flower's
    status details."""
    from fedlora.flower.loopback import LoopbackFederation

    fed = LoopbackFederation(tmp_path)

    def listed(status, details=""):
        return subprocess.CompletedProcess([], 0, json.dumps({"runs": [{"status": status, "status-details": details}]}), "")

    def ran(stream):
        return subprocess.CompletedProcess([], 0, "Successfully started run 42\n" + stream, "")

    fed.flwr = lambda *a, **k: listed("finished:completed")
    assert fed.outcome(ran("INFO : fedlora: round 1 ...\n")) == (0, "")
    fed.flwr = lambda *a, **k: listed("finished:failed", "ServerApp failed with exception: 'x' already holds a run; pass …")
    assert fed.outcome(ran("ERROR : ServerApp raised an exception\nfedlora.RunRefused: 'x' already holds a run; pass …\n")) == (
        2, "'x' already holds a run; pass …")
    fed.flwr = lambda *a, **k: listed("finished:failed", "ServerApp failed with exception: CUDA out of memory\nmore")
    code, reason = fed.outcome(ran("Traceback ...\nRuntimeError: CUDA out of memory\n"))
    assert code == 1 and "finished:failed: CUDA out of memory; see" in reason and "\n" not in reason
    code, reason = fed.outcome(subprocess.CompletedProcess([], 1, "", "SuperLink unreachable\n"))
    assert code == 1 and "SuperLink unreachable" in reason


def test_the_server_app_ends_once_the_parent_flower_named_is_gone(monkeypatch):
    """Flower's own exit retries the dead SuperLink for minutes, holding the run directory's lock; ours follows the
    `--parent-pid` Flower gives flwr-serverapp, and does nothing where there is none (in-process runs)."""
    import threading

    from fedlora.flower.server_app import exit_with_parent

    assert exit_with_parent(argv=["flwr-serverapp", "--token", "x"]) is None
    parent = subprocess.Popen(["sleep", "30"])
    exited = threading.Event()
    monkeypatch.setattr(os, "_exit", lambda code: exited.set())
    watcher = exit_with_parent(grace=0.0, poll=0.05, argv=["flwr-serverapp", "--parent-pid", str(parent.pid)])
    time.sleep(0.3)
    assert watcher.is_alive() and not exited.is_set()  # the parent lives: nothing happens
    parent.kill()
    parent.wait()
    assert exited.wait(5) and (watcher.join(5) or not watcher.is_alive())
