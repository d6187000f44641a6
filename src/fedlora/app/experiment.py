"""One experiment, end to end: validated settings → the build → every round → the run directory.

The CLI, the Python API (``fedlora.run``), comparisons and studies all run through :func:`run_experiment`; the
Flower ServerApp builds with the same :func:`~fedlora.app.build.build` and writes the same :class:`RunDir`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fedlora.app.build import Experiment, build, majority_rate, reference_clients
from fedlora.app.config import RunConfig
from fedlora.app.rundir import (
    CHECKPOINT,
    RunDir,
    check_resume,
    check_trained,
    load_checkpoint,
    metrics_line,
    resume_config,
    same_settings,
    save_checkpoint,
)
from fedlora.app.systems import check_simulated

__all__ = [
    "CHECKPOINT", "Experiment", "RunConfig", "RunDir", "build", "check_resume", "load_checkpoint", "majority_rate", "metrics_line",
    "reference_clients", "resume_config", "run_experiment", "run_or_resume", "same_settings", "save_checkpoint",
]


def run_experiment(config: RunConfig, *, on_client: Callable | None = None, on_round: Callable | None = None, resume: bool = False,
                   on_progress: Callable[[str, int], None] | None = None, group=None) -> tuple[Experiment, list[dict]]:
    """Build, run every round, write the run directory (when ``config.out`` is set) and return the metrics.

    With ``out`` set, every completed round appends to ``metrics.jsonl`` and replaces ``checkpoint.safetensors``
    (and goes to the trackers of ``config.track``); ``resume=True`` continues such a directory from its last
    completed round. ``group``: the comparison or study (:class:`fedlora.app.tracking.Group`) the run belongs to.
    """
    config.validate()
    check_simulated(config)  # a simulated deadline needs a clock (on Flower --deadline is the round timeout)
    if config.secure_aggregation:
        raise ValueError("secure aggregation runs on Flower (SecAgg+ hides each upload from a server across a network); set "
                         "secure-aggregation = true in the Flower run config (docs/flower.md), or drop --secure-aggregation")
    if not config.out:
        if config.track:
            raise ValueError(f"track={config.track!r} logs a run directory's rounds; set out (--out) to a directory, or drop track")
        return _run(config, None, None, on_client, on_round, on_progress)
    fresh = not Path(config.out).exists()
    run_dir = RunDir(config.out).prepare()
    try:
        with run_dir.hold():
            checkpoint = run_dir.start(config, resume=resume, group=group)
            return _run(config, run_dir, checkpoint, on_client, on_round, on_progress)
    except ValueError:
        # Refused before any round finished (data, model or a setting checked against them): a directory this run
        # created holds nothing but its config.json, so it goes, and the user's next run can use the same --out.
        if fresh and not run_dir.has_metrics():
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise


def _run(config: RunConfig, run_dir: RunDir | None, checkpoint, on_client, on_round, on_progress) -> tuple[Experiment, list[dict]]:
    """``run_experiment`` once the run directory (if any) is prepared and held."""

    def record(metrics: dict) -> None:
        if run_dir is not None:
            run_dir.record(metrics, exp.simulator, config)
        if on_round:
            on_round(metrics)

    t0 = time.perf_counter()
    exp = build(config, on_client=on_client, on_round=record, on_progress=on_progress)
    if checkpoint is not None:
        exp.simulator.restore(*checkpoint)
    if run_dir is not None:
        run_dir.reset_metrics(exp.simulator.history)
    history = exp.simulator.run()
    if run_dir is not None:
        run_dir.finish(exp, history, time.perf_counter() - t0)
    check_trained(history, config.out)  # after the files are written: a run that trained nothing is kept, and refused
    return exp, history


def run_or_resume(config: RunConfig, group=None, **callbacks) -> tuple[list[dict], bool]:
    """A run of a comparison or study: a finished one in ``config.out`` read back (and logged to the trackers it
    was not logged to yet), an interrupted one resumed, or a new one made. Returns its history and whether it was
    read back."""
    run_dir = RunDir(config.out)
    done = run_dir.finished(config)
    if done is not None:
        check_trained(done, config.out)
        if config.track:
            from fedlora.app.tracking import log_finished

            log_finished(config, run_dir.path, done, group)
        return done, True
    resume = run_dir.path.exists() and run_dir.interrupted()
    _, history = run_experiment(config, resume=resume, group=group, **callbacks)
    return history, False


def default_out(config: RunConfig, what: str = "") -> str:
    """``runs/METHOD[-what]-TIMESTAMP``: where a run without ``out`` writes."""
    return str(Path("runs") / time.strftime(f"{config.method}{what}-%Y%m%d-%H%M%S"))
