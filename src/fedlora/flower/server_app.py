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

from fedlora.app.experiment import RunConfig, build, check_resume, load_checkpoint, metrics_line, save_checkpoint
from fedlora.flower.config import FLOWER_ONLY, flower_options, from_flower
from fedlora.flower.secure import secure_round
from fedlora.flower.strategy import FedLoRAStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = from_flower(context.run_config).validate()
    options = flower_options(context.run_config)
    run_federation(grid, config, resume=bool(options["resume"]), round_timeout=float(options["round-timeout"]))


def run_federation(grid: Grid, config: RunConfig, *, resume: bool = False, round_timeout: float = FLOWER_ONLY["round-timeout"]) -> list[dict]:
    """Build, connect the partitions' SuperNodes, run every round, write the run directory; returns the metrics.

    After every round the run directory gets ``checkpoint.safetensors`` (the simulator's, with the strategy's own
    state in it: which broadcasts each client has applied, the broadcasts still pending); ``resume=True`` continues
    the run in ``config.out`` from it. A round waits ``round_timeout`` seconds for its replies; a SuperNode silent
    longer is left out of the round (recorded as rejected) and rejoins when it answers again."""
    if not config.out:
        if resume:
            raise ValueError("resume needs the run directory: pass --run-config \"out='runs/NAME' resume=true\"")
        config.out = str(Path("runs") / time.strftime(f"{config.method}-flower-%Y%m%d-%H%M%S"))
    out = Path(config.out).resolve()
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(out)
        check_resume(config, checkpoint[1], out)
    elif (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:  # as `fedlora run`
        raise ValueError(f"{str(out)!r} already holds a run; pass a new out, e.g. --run-config \"out='{out}-2'\", "
                         "or resume=true to continue it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    log(INFO, "fedlora: %s on Flower, %s clients, %s rounds; run directory %s%s", config.method, config.clients, config.rounds, out,
        f" (resumed after round {checkpoint[1]['round']})" if checkpoint else "")

    t0 = time.perf_counter()
    exp = build(config)
    why = exp.simulator.method.in_process_only
    if why:
        raise ValueError(f"method {config.method} runs in-process only ({why}); run it with `fedlora run --method {config.method}`")
    strategy = FedLoRAStrategy(exp)
    if checkpoint is not None:
        exp.simulator.restore(*checkpoint)
        strategy.load(*checkpoint)
    (out / "metrics.jsonl").write_text("".join(metrics_line(m) for m in exp.simulator.history))  # drops rounds after the checkpoint
    strategy.connect(grid)
    if checkpoint is None:
        strategy.setup(grid, round_timeout)  # round 0, for a method that has one
    for rnd in range(len(exp.simulator.history) + 1, config.rounds + 1):
        started = time.perf_counter()
        strategy.refresh(grid)  # a SuperNode that restarted since takes its partition back
        if config.secure_aggregation:  # SecAgg+: the server learns only the weighted sum of the uploads
            metrics = secure_round(strategy, grid, rnd, started, timeout=round_timeout)
        else:
            replies = grid.send_and_receive(strategy.configure_train(rnd), timeout=round_timeout)
            metrics = strategy.aggregate_train(rnd, replies, started)
        with open(out / "metrics.jsonl", "a") as f:  # the line `fedlora run` writes (NaN as null)
            f.write(metrics_line(metrics))
        save_checkpoint(exp.simulator, out, config, extra=strategy.state())
        div = "—" if metrics["divergence"] is None else f"{metrics['divergence']:.4f}"
        log(INFO, "fedlora: round %s  global %.3f  local %.3f  ρ %s  up %s B  down %s B  rejected %s", rnd,
            metrics["global_accuracy"], metrics["local_accuracy"], div, metrics["bytes_up"], metrics["bytes_down"],
            metrics.get("n_rejected", 0))

    from fedlora.app.export import save_run_artifacts
    from fedlora.app.report import write_summary

    history = exp.simulator.history
    save_run_artifacts(exp, out)
    write_summary(exp, history, out, wall_seconds=time.perf_counter() - t0)
    (out / "flower.json").write_text(json.dumps({
        "flwr_version": flwr.__version__,
        "run_id": grid.run.run_id,
        "supernodes": {str(cid): node for cid, node in sorted(strategy.nodes.items())},
        "private_state": "context.state of each SuperNode (and its state-dir: `fedlora export-private`)"
        if exp.simulator.method.private(exp.simulator.handle) else None,
        "accepted": {str(cid): r for cid, r in sorted(strategy.accepted.items())},
    }, indent=2) + "\n")
    log(INFO, "fedlora: run directory %s", out)
    return history

