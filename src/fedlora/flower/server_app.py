"""fedlora's Flower ServerApp: ``fedlora run`` with its clients on SuperNodes, writing the same run directory.

The run config (``[tool.flwr.app.config]``, ``flwr run --run-config``) holds ``fedlora run``'s long flags; see
:mod:`fedlora.flower.config`. The run directory has what ``fedlora run`` writes (``config.json``, ``metrics.jsonl``
with the same numbers, ``adapter/``, ``base_delta.safetensors`` for fedex/flora, ``summary.md``) plus
``flower.json`` (which SuperNode held which partition). For ``fedsa`` there is no ``private/``: each client's B and
head stay in its SuperNode's ``context.state``; ``adapter/`` holds the global model as scored (shared Â with the
clients' mean B and head), as with ``fedlora run``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from logging import INFO
from pathlib import Path

import flwr
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.flower.config import from_flower
from fedlora.flower.secure import secure_round
from fedlora.flower.strategy import FedLoRAStrategy
from fedlora.frontend.experiment import RunConfig, build, metrics_line

REPLY_TIMEOUT_SECONDS = 6 * 3600.0  # a round's replies; a SuperNode that never answers is left out after this

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_flower(context.run_config).validate()
    run_federation(grid, config)


def run_federation(grid: Grid, config: RunConfig) -> list[dict]:
    """Build, connect the partitions' SuperNodes, run every round, write the run directory; returns the metrics."""
    if not config.out:
        config.out = str(Path("runs") / time.strftime(f"{config.method}-flower-%Y%m%d-%H%M%S"))
    out = Path(config.out).resolve()
    if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:  # as `fedlora run`
        raise ValueError(f"{str(out)!r} already holds a run; pass a new out, e.g. --run-config \"out='{out}-2'\"")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    (out / "metrics.jsonl").write_text("")
    log(INFO, "fedlora: %s on Flower, %s clients, %s rounds; run directory %s", config.method, config.clients, config.rounds, out)

    t0 = time.perf_counter()
    exp = build(config)
    why = exp.simulator.method.in_process_only
    if why:
        raise ValueError(f"method {config.method} runs in-process only ({why}); run it with `fedlora run --method {config.method}`")
    strategy = FedLoRAStrategy(exp)
    strategy.connect(grid)
    strategy.setup(grid, REPLY_TIMEOUT_SECONDS)  # round 0, for a method that has one
    for rnd in range(1, config.rounds + 1):
        started = time.perf_counter()
        if config.secure_aggregation:  # SecAgg+: the server learns only the weighted sum of the uploads
            metrics = secure_round(strategy, grid, rnd, started, timeout=REPLY_TIMEOUT_SECONDS)
        else:
            replies = grid.send_and_receive(strategy.configure_train(rnd), timeout=REPLY_TIMEOUT_SECONDS)
            metrics = strategy.aggregate_train(rnd, replies, started)
        with open(out / "metrics.jsonl", "a") as f:  # the line `fedlora run` writes (NaN as null)
            f.write(metrics_line(metrics))
        div = "—" if metrics["divergence"] is None else f"{metrics['divergence']:.4f}"
        log(INFO, "fedlora: round %s  global %.3f  local %.3f  ρ %s  up %s B  down %s B  rejected %s", rnd,
            metrics["global_accuracy"], metrics["local_accuracy"], div, metrics["bytes_up"], metrics["bytes_down"],
            metrics.get("n_rejected", 0))

    from fedlora.frontend.export import save_run_artifacts
    from fedlora.frontend.report import write_summary

    history = exp.simulator.history
    save_run_artifacts(exp, out)
    write_summary(exp, history, out, wall_seconds=time.perf_counter() - t0)
    (out / "flower.json").write_text(json.dumps({
        "flwr_version": flwr.__version__,
        "run_id": grid.run.run_id,
        "supernodes": {str(cid): node for cid, node in sorted(strategy.nodes.items())},
        "private_state": "context.state of each SuperNode" if exp.simulator.method.private(exp.simulator.handle) else None,
    }, indent=2) + "\n")
    log(INFO, "fedlora: run directory %s", out)
    return history

