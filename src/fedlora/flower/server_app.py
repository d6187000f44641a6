"""fedlora's Flower ServerApp: ``fedlora run`` with its clients on SuperNodes, writing the same run directory.

The run config (``[tool.flwr.app.config]``, ``flwr run --run-config``) holds ``fedlora run``'s long flags; see
:mod:`fedlora.flower.config`. The run directory has what ``fedlora run`` writes (``config.json``, ``metrics.jsonl``
with the same numbers, ``adapter/``, ``base_delta.safetensors`` for fedex/flora, ``summary.md``) plus
``flower.json`` (which SuperNode held which partition). For ``fedsa`` there is no ``private/``: each client's B and
head stay in its SuperNode's ``context.state``; ``adapter/`` holds the global model as scored (shared Â with the
clients' mean B and head), as with ``fedlora run``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from logging import ERROR, INFO
from pathlib import Path

import flwr
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.app.experiment import RunConfig, RunDir, build, default_out
from fedlora.flower.asynchronous import private_refusal, run_async
from fedlora.flower.config import FLOWER_ONLY, flower_options, from_flower
from fedlora.flower.secure import secure_round
from fedlora.flower.strategy import FedLoRAStrategy

app = ServerApp()


class RunRefused(ValueError):
    """A run the ServerApp refuses (a setting, the run directory, a resume that does not fit): one line in Flower's log.

    Our choice: Flower logs a ServerApp's exception with its traceback and marks the run failed with
    ``str(exception)`` as its status details (``flwr ls``). For the one-line errors fedlora gives everywhere else
    (ValueError, as the CLI prints them) the traceback says nothing, so this exception shows none: its
    ``__traceback__`` reads as None (Python still unwinds with the real one). Its name in the log,
    ``fedlora.RunRefused``, is what ``scripts/flower_deploy.sh`` looks for to exit 2 rather than 1."""

    __module__ = "fedlora"

    @property
    def __traceback__(self):
        return None

    @__traceback__.setter
    def __traceback__(self, value) -> None:
        pass


def exit_with_parent(grace: float = 10.0, poll: float = 1.0, argv: list[str] | None = None) -> threading.Thread | None:
    """End this process ``grace`` seconds after the parent Flower named (``--parent-pid``: the SuperExec that started
    this ``flwr-serverapp``) is gone; the watching thread, or None where Flower named no parent (in-process runs).

    Our choice: Flower's ServerApp process watches that parent too and starts its own exit when it dies, but that
    exit first pushes the run's status and logs to the SuperLink, which is gone with it, and retries for minutes.
    Meanwhile the process holds the run directory's lock, so ``resume=true`` after the deployment was killed was
    refused as "being written". Nothing it could still write is worth keeping (the checkpoint is replaced
    atomically), so it ends without ceremony; its lock is then stale and taken over."""
    argv = sys.argv if argv is None else argv
    try:
        parent = int(argv[argv.index("--parent-pid") + 1])
    except (ValueError, IndexError):
        return None

    def alive() -> bool:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(poll)
        time.sleep(grace)  # Flower's own exit first, when it can still finish
        log(ERROR, "fedlora: the ServerApp's parent process (Flower's SuperExec) is gone; exiting. Continue the run "
            "with resume=true in its run config")
        os._exit(1)

    thread = threading.Thread(target=watch, name="fedlora-exit-with-parent", daemon=True)
    thread.start()
    return thread


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_with_parent()
    try:
        config = from_flower(context.run_config).validate()
        options = flower_options(context.run_config)
        run_federation(grid, config, resume=bool(options["resume"]), round_timeout=float(options["round-timeout"]))
    except ValueError as exc:  # as the CLI: one line, no traceback
        raise RunRefused(str(exc.args[0]) if exc.args else str(exc)) from None


def run_federation(grid: Grid, config: RunConfig, *, resume: bool = False, round_timeout: float = FLOWER_ONLY["round-timeout"]) -> list[dict]:
    """Build, connect the partitions' SuperNodes, run every round, write the run directory; returns the metrics.

    The run directory is held with the same lock as ``fedlora run`` (a second run, or a resume beside the first, on
    the same ``out`` is refused). After every round it gets ``checkpoint.safetensors`` (the simulator's, with the
    strategy's own state in it: which broadcasts each client has applied, the broadcasts still pending);
    ``resume=True`` continues the run in ``config.out`` from it. A round waits ``round_timeout`` seconds for its
    replies (or the run's ``deadline``, when shorter); a SuperNode silent longer is left out of the round (recorded as
    rejected) and rejoins when it answers again."""
    config.validate()
    if not config.out:
        if resume:
            raise ValueError("resume needs the run directory: pass --run-config \"out='runs/NAME' resume=true\"")
        config.out = default_out(config, "-flower")
    why = method_in_process_only(config)
    if why:
        raise ValueError(f"method {config.method} runs in-process only ({why}); run it with `fedlora run --method {config.method}`")
    if config.async_mode and resume:
        raise ValueError(f"resume with async-mode = {config.async_mode!r} on Flower is not supported in this version (the clients "
                         "in flight are not recovered); start a new out, or resume with `fedlora run --async`")
    if config.async_mode and config.client_speeds:
        raise ValueError("client-speeds model simulated time, which the in-process simulator runs; on Flower a client's speed is "
                         "real: drop client-speeds from the run config, or run `fedlora run --async`")
    systems = systems_in_process_only(config)
    if systems:
        raise ValueError(f"{systems} model(s) simulated time, which the in-process simulator runs (docs/systems.md); on Flower "
                         "a deployment's time is real (deadline is the round timeout): drop them from the run config, or run `fedlora run`")
    if config.deadline is not None:  # on Flower the round's deadline is real: the round timeout, whichever is shorter
        round_timeout = min(round_timeout, float(config.deadline))
    run_dir = RunDir(Path(config.out).resolve()).prepare()
    with run_dir.hold():
        checkpoint = run_dir.start(config, resume=resume, new_run_hint="pass a new out, e.g. --run-config \"out='{out}-2'\", "
                                   "or resume=true to continue it")
        return _rounds(quick_poll(grid), config, run_dir, checkpoint, round_timeout)


POLL_SECONDS = 0.1  # how often a round's replies are pulled from the SuperLink


class _QuickPoll:
    """The deployment's Grid with ``send_and_receive`` pulling replies every :data:`POLL_SECONDS`.

    Our choice: Flower's deployment Grid (``HttpGrid``, flwr 1.41) sleeps 3 s between pulls, so each round waited
    up to 3 s after its last reply had reached the SuperLink (MiniLM, 2 SuperNodes: the clients' turns overlapped,
    6.6 s each, yet 8.4 s passed between the end of one round's turns and the start of the next, 1.6 s of it the
    server's aggregation and scoring). A pull is one small request to the SuperLink on the same host or network."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def send_and_receive(self, messages, *, timeout=None):
        pending = {mid for mid in self.grid.push_messages(list(messages)) if mid}
        end = None if timeout is None else time.monotonic() + timeout
        replies = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(POLL_SECONDS)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def quick_poll(grid: Grid) -> Grid:
    """``grid`` behind :class:`_QuickPoll` when it is Flower's deployment Grid with its own ``send_and_receive``;
    any other (the simulation's InMemoryGrid, which polls every 0.1 s already; a test's) as it is."""
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # another Flower layout: its own polling
        return grid
    if isinstance(grid, HttpGrid) and type(grid).send_and_receive is HttpGrid.send_and_receive:
        return _QuickPoll(grid)
    return grid


def method_in_process_only(config: RunConfig) -> str | None:
    """Why the settings' method cannot run on Flower (``central``, ``local``), or None; known before any loading."""
    return config.method_object().in_process_only


def systems_in_process_only(config: RunConfig) -> str:
    """The systems settings given that only the simulator runs in this version (devices, availability, over-select),
    "" when none is. ``deadline`` runs here: as the round timeout."""
    given = [name for name, on in (("devices", config.devices), ("availability", config.availability),
                                   ("over-select", config.over_select > 1)) if on]
    return ", ".join(given)


def _rounds(grid: Grid, config: RunConfig, run_dir: RunDir, checkpoint, round_timeout: float) -> list[dict]:
    out = run_dir.path
    log(INFO, "fedlora: %s on Flower, %s clients, %s rounds; run directory %s%s", config.method, config.clients, config.rounds, out,
        f" (resumed after round {checkpoint[1]['round']})" if checkpoint else "")
    t0 = time.perf_counter()
    exp = build(config)
    strategy = FedLoRAStrategy(exp)
    if checkpoint is not None:
        exp.simulator.restore(*checkpoint)
        strategy.load(*checkpoint)
    if config.async_mode and (why := private_refusal(strategy)):
        raise ValueError(why)
    run_dir.reset_metrics(exp.simulator.history)
    strategy.connect(grid)
    if checkpoint is None:
        strategy.setup(grid, round_timeout)  # round 0, for a method that has one

    def record(metrics: dict) -> None:
        run_dir.record(metrics, exp.simulator, config, extra=strategy.state())  # the line `fedlora run` writes (NaN as null)
        div = "—" if metrics["divergence"] is None else f"{metrics['divergence']:.4f}"
        step = f"version {metrics['version']} (staleness {metrics['staleness']})" if "version" in metrics else f"round {metrics['round']}"
        log(INFO, "fedlora: %s  global %.3f  local %.3f  ρ %s  up %s B  down %s B  rejected %s", step,
            metrics["global_accuracy"], metrics["local_accuracy"], div, metrics["bytes_up"], metrics["bytes_down"],
            metrics.get("n_rejected", 0))

    if config.async_mode:  # FedAsync / FedBuff: a version step per arrival or per K (fedlora.flower.asynchronous)
        run_async(strategy, grid, record, round_timeout)
    else:
        for rnd in range(len(exp.simulator.history) + 1, config.rounds + 1):
            started = time.perf_counter()
            strategy.refresh(grid)  # a SuperNode that restarted since takes its partition back
            if config.secure_aggregation:  # SecAgg+: the server learns only the weighted sum of the uploads
                metrics = secure_round(strategy, grid, rnd, started, timeout=round_timeout)
            else:
                replies = grid.send_and_receive(strategy.configure_train(rnd), timeout=round_timeout)
                metrics = strategy.aggregate_train(rnd, replies, started)
            record(metrics)
    history = exp.simulator.history
    run_dir.finish(exp, history, time.perf_counter() - t0)
    _write_flower_json(out, grid, strategy, exp)
    log(INFO, "fedlora: run directory %s", out)
    return history


def _write_flower_json(out: Path, grid: Grid, strategy: FedLoRAStrategy, exp) -> None:
    (out / "flower.json").write_text(json.dumps({
        "flwr_version": flwr.__version__,
        "run_id": grid.run.run_id,
        "supernodes": {str(cid): node for cid, node in sorted(strategy.nodes.items())},
        "private_state": "context.state of each SuperNode (and its state-dir: `fedlora export-private`)"
        if exp.simulator.method.private(exp.simulator.handle) else None,
        "accepted": {str(cid): r for cid, r in sorted(strategy.accepted.items())},
    }, indent=2) + "\n")
