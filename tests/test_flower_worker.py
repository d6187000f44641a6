"""The SuperNode's model worker: the thin ClientApp hands every message to a long-lived process that built the model
once, and the run's numbers are the simulator's (private state, folds, catch-up all cross the worker boundary in
``context.state``, never staying in the worker)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_config

pytest.importorskip("flwr")

from fedlora.app.experiment import build  # noqa: E402
from fedlora.flower.inline import InlineGrid  # noqa: E402
from fedlora.flower.server_app import run_federation  # noqa: E402
from fedlora.flower.worker import request  # noqa: E402
from test_flower import assert_same_history  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture
def worker(tmp_path):
    sock = tmp_path / "worker.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.flower.worker", "--socket", str(sock)],
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not sock.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no socket"
            time.sleep(0.05)
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not sock.exists()  # it removed its socket on SIGTERM


@pytest.mark.parametrize("method,fraction", [("fedsa", 0.67), ("fedex", 1.0)])
def test_runs_through_the_model_worker_equal_the_simulator_and_build_the_model_once(small_csv, tmp_path, worker, method, fraction):
    cfg = tiny_config(small_csv, method=method, fraction=fraction, rounds=3)
    reference = build(cfg).simulator.run()
    grid = InlineGrid(cfg, model_worker=worker, fresh=True)
    history = run_federation(grid, cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, reference)
    stats, _, _ = request(worker, "stats")
    assert stats["builds"] == 1  # one model for every message of the run (the server's own build is in this process)
    assert stats["handled"] == len(grid.sent) and stats["pid"] != os.getpid()


def test_a_client_error_in_the_worker_is_the_client_s_error(small_csv, tmp_path, worker):
    """The SuperNodes lack the run's data file: the worker's build raises, each client's reply is that error, and the
    server goes on with none (the error text is the ClientApp's own)."""
    cfg = tiny_config(small_csv, method="fedit", rounds=1)
    missing = cfg.replace(data=str(tmp_path / "gone.csv"))
    history = run_federation(InlineGrid(missing, model_worker=worker), cfg.replace(out=str(tmp_path / "run")))
    assert history[0]["n_rejected"] == cfg.clients and history[0]["skipped"]
    assert all("DataError: no such file" in r["reason"] and "gone.csv" in r["reason"] for r in history[0]["rejected"])


def test_no_worker_on_the_socket_is_one_line(small_csv, tmp_path):
    with pytest.raises(RuntimeError, match="no fedlora model worker answers on .*; start one with `python -m fedlora.flower.worker"):
        request(tmp_path / "none.sock", "stats")


def test_a_worker_that_is_gone_costs_time_not_the_run(small_csv, tmp_path):
    """model-worker names a socket nobody listens on (the worker died): each message is handled in the ClientApp's
    own process instead, and the numbers are the simulator's."""
    cfg = tiny_config(small_csv, method="fedsa", rounds=2)
    history = run_federation(InlineGrid(cfg, model_worker=str(tmp_path / "dead.sock")), cfg.replace(out=str(tmp_path / "run")))
    assert_same_history(history, build(cfg).simulator.run())


def test_a_socket_path_too_long_for_unix_sockets(tmp_path, capsys):
    """A worker asked for a socket path over the 107 bytes AF_UNIX allows says so in one line; the loopback
    federation puts its workers' sockets in a short folder when its work directory is deep."""
    from fedlora.flower.loopback import LoopbackFederation
    from fedlora.flower.worker import MAX_SOCKET_PATH, main

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert main(["--socket", str(deep / "w.sock")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "over the 107 a Unix socket allows" in err and "--socket" in err
    fed = LoopbackFederation(deep, supernodes=2)
    sock = fed.worker_socket(1)
    assert len(str(sock)) <= MAX_SOCKET_PATH and sock.name == "supernode-1.sock"
    assert fed.worker_socket(0).parent == sock.parent  # one folder for the federation's workers
    assert not fed.stop() and not sock.parent.exists()
    near = LoopbackFederation(tmp_path / "fed", supernodes=2)
    assert near.worker_socket(0) == tmp_path / "fed" / "workers" / "supernode-0.sock"
