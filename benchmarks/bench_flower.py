"""Wall time of one job in-process vs Flower simulation vs a loopback Flower deployment, as ratios.

The job: tiny random BERT, 4 clients, 3 rounds (florana by default). Each engine runs it once in this invocation,
from a command a user would type, and each must write the same numbers (divergence and bytes checked equal) — so
the ratios compare engines doing the same work.

- in-process: ``fedlora run`` (one process; its wall time includes Python and library start-up);
- Flower simulation: ``flwr run . local --stream`` on an already running local SuperLink (Ray starts per run);
- loopback deployment: ``flwr run . loopback --stream`` on a running SuperLink + 4 SuperNodes, TLS and SuperNode
  authentication (a process per ClientApp message, SuperNodes poll for messages every 3 s when idle).

Starting the SuperLink (and SuperNodes) is infrastructure that stays up between runs; its time is shown apart.

    python benchmarks/bench_flower.py                 # ~5 min on 2 cores
    python benchmarks/bench_flower.py --method fedsa
    python benchmarks/bench_flower.py --model minilm --clients 2 --local-steps 20 --batch-size 16   # a larger round
    python benchmarks/bench_flower.py --model minilm --method fedsa --clients 2 --local-steps 20 --batch-size 16 \
        --max-length 32 --engines deployment,workers --state-dirs    # issue 28's size, as flower_deploy.sh runs it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def job(method: str, out: Path, model: str = "tiny"):
    from fedlora.app.experiment import RunConfig

    if model == "minilm":  # the offline default's model, a short job: what a real deployment pays per round
        return RunConfig(method=method, model="minilm", data="tweets", clients=4, rounds=3, local_steps=4, batch_size=16,
                         examples_per_client=80, test_examples=200, max_length=48, partition="iid", device="cpu", out=str(out))
    return RunConfig(method=method, model="tiny:bert", data="tweets", clients=4, rounds=3, local_steps=5, batch_size=8,
                     rank=4, examples_per_client=60, test_examples=100, max_length=32, partition="iid", device="cpu",
                     out=str(out))


def timed(command: list[str], env: dict, cwd: Path, timeout: float = 1800) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(res.stdout + res.stderr)[-4000:]}")
    return wall


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    from fedlora.app.experiment import RunConfig
    from fedlora.flower.loopback import FLOWER_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="florana")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process, the same for every engine; 0: each "
                   "engine's default (torch's for in-process, the loopback's share of the cores per SuperNode)")
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny", help="tiny random BERT (default) or MiniLM-L6")
    p.add_argument("--clients", type=int, default=None, help="override the job's clients (one SuperNode each)")
    p.add_argument("--local-steps", type=int, default=None, help="override the job's local steps per round")
    p.add_argument("--batch-size", type=int, default=None, help="override the job's batch size")
    p.add_argument("--max-length", type=int, default=None, help="override the job's maximum sequence length in tokens")
    p.add_argument("--state-dirs", action="store_true",
                   help="give each SuperNode a state directory (node config state-dir), as scripts/flower_deploy.sh does")
    p.add_argument("--engines", default="in-process,simulation,deployment,workers",
                   help="comma-separated: in-process (always run: the reference), simulation, deployment, workers")
    args = p.parse_args()
    engines = set(args.engines.split(",")) | {"in-process"}
    # One setting for all engines: on a shared machine OpenMP's spinning threads otherwise dominate a tiny job.
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    rows, runs = [], {}

    # 1. in-process: `fedlora run`
    cfg = job(args.method, work / "inprocess", args.model)
    over = {k: v for k, v in (("clients", args.clients), ("local_steps", args.local_steps), ("batch_size", args.batch_size),
                                             ("max_length", args.max_length)) if v}
    cfg = cfg.replace(**over)
    defaults = RunConfig().to_dict()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.to_dict().items() if v != defaults[k] and k != "out"]
    wall = timed([sys.executable, "-m", "fedlora.cli.main", "run", "--quiet", *flags, "--out", cfg.out], os.environ | FLOWER_ENV | threads, ROOT)
    rows.append(("in-process (`fedlora run`)", wall, None))
    runs["in-process"] = metrics(Path(cfg.out))

    # 2. Flower simulation: `flwr run . local`
    if "simulation" in engines:
        simulation(cfg, work, threads, rows, runs)
    # 3. loopback deployment: SuperLink + 4 SuperNodes, TLS + SuperNode auth; 4. the same with a model worker each
    for name, workers in (("deployment", False), ("workers", True)):
        if name in engines:
            deployment(cfg, work, threads, rows, runs, workers, args.state_dirs)

    ref = runs["in-process"]
    for name, got in runs.items():  # the same run: identical divergence and bytes, round by round
        for g, r in zip(got, ref, strict=True):
            for key in ("divergence", "bytes_up", "bytes_down"):
                # each engine's own thread count (--threads 0) sums in another order: the same run up to rounding
                same = g[key] == r[key] if args.threads or key != "divergence" else abs(g[key] - r[key]) <= 1e-3 * abs(r[key])
                assert same, (name, g["round"], key, g[key], r[key])

    print(f"(runs, logs and the SuperNodes' state in {work})")
    base = rows[0][1]
    base_round = _later_rounds(runs["in-process"])
    print(f"job: {args.method}, {cfg.model}, {cfg.clients} clients, {cfg.rounds} rounds × {cfg.local_steps} local steps × "
          f"batch {cfg.batch_size}, max length {cfg.max_length}, {args.threads} thread(s) per process (identical divergence and bytes in all engines)\n")
    print("| engine | wall s | × in-process | s per round after the first | × in-process | infrastructure start s |")
    print("|---|---|---|---|---|---|")
    for (label, wall, setup), name in zip(rows, runs):
        per = _later_rounds(runs[name])
        print(f"| {label} | {wall:.1f} | {wall / base:.2f} | {per:.1f} | {per / base_round:.2f} | {'—' if setup is None else f'{setup:.1f}'} |")


def _later_rounds(history: list[dict]) -> float:
    """Mean wall time of the rounds after the first (from metrics.jsonl): what each further round costs."""
    later = [m["wall_seconds"] for m in history[1:]] or [history[0]["wall_seconds"]]
    return sum(later) / len(later)


def simulation(cfg, work: Path, threads: dict, rows: list, runs: dict) -> None:
    from fedlora.flower.config import to_toml
    from fedlora.flower.loopback import FLOWER_ENV, family, free_port, terminate

    home = work / "flwr-home-sim"
    env = os.environ | FLOWER_ENV | threads | {"FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                                     "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    started: set[int] = set()
    try:
        setup = timed(["flwr", "ls", "local"], env, ROOT)  # starts the local SuperLink
        sim_cfg = cfg.replace(out=str(work / "simulation"))
        (work / "simulation.toml").write_text(to_toml(sim_cfg))
        wall = timed(["flwr", "run", ".", "local", "--run-config", str(work / "simulation.toml"),
                      "--federation-config", f"num-supernodes={cfg.clients}", "--stream"], env, ROOT)
        rows.append(("Flower simulation (`flwr run . local`)", wall, setup))
        runs["simulation"] = metrics(Path(sim_cfg.out))
    finally:
        roots = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid() and _cmdline_has(int(e), str(home))]
        started = family(roots)
        left = terminate(started)
        assert not left, f"could not stop {sorted(left)}"



def deployment(cfg, work: Path, threads: dict, rows: list, runs: dict, workers: bool, state_dirs: bool = False) -> None:
    from fedlora.flower.config import to_toml
    from fedlora.flower.loopback import LoopbackFederation

    name = "workers" if workers else "deployment"
    dep_cfg = cfg.replace(out=str(work / name))
    (work / f"{name}.toml").write_text(to_toml(dep_cfg))
    fed = LoopbackFederation(work / f"federation-{name}", supernodes=cfg.clients, env=threads, workers=workers,
                             state_dirs=state_dirs)
    try:
        t0 = time.perf_counter()
        fed.start()
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = fed.run(ROOT, str(work / f"{name}.toml"))
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{(res.stdout + res.stderr)[-4000:]}")
        label = (f"loopback deployment (TLS + auth, {cfg.clients} SuperNodes" + (", a model worker each" if workers else "")
                 + (", a state directory each)" if state_dirs else ")"))
        rows.append((label, wall, setup))
        runs[name] = metrics(Path(dep_cfg.out))
    finally:
        left = fed.stop()
        assert not left, f"could not stop {sorted(left)}"


def _cmdline_has(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


if __name__ == "__main__":
    main()
