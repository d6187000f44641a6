"""Simulator overhead and memory, each against a reference measured in the same run.

1. Local-training throughput (examples/s) inside the simulator vs a plain single-model PEFT loop on the same
   model, batch, data and optimizer. Target ratio ≥ 0.9.
2. Peak RSS of a `fedsa` run with 100 clients vs 2 clients (each in its own subprocess). Target ≤ 1.3×.

    python benchmarks/bench_simulator.py            # MiniLM-L6 (offline default), ~3 min on 2 cores
    python benchmarks/bench_simulator.py --quick    # tiny random BERT, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _reference import best_seconds, plain_peft_loop, simulated_client  # noqa: E402


def throughput(model_name: str, steps: int, repeats: int) -> tuple[float, float]:
    from fedlora.app.experiment import RunConfig, build
    from fedlora.federation.simulator import round_seed

    cfg = RunConfig(model=model_name, clients=1, rounds=1, local_steps=steps, batch_size=16, partition="iid",
                    examples_per_client=steps * 16 + 40, test_examples=50, method="fedit", device="cpu")
    exp = build(cfg)
    sim, client = exp.simulator, exp.simulator.clients[0]
    n = steps * cfg.batch_size

    def plain_loop() -> None:
        plain_peft_loop(sim.model, client.train, steps=steps, batch=16, lr=cfg.lr, seed=0,
                        loss=lambda model, batch: model(**batch).loss)

    best = best_seconds({"plain": plain_loop,
                         "sim": lambda: simulated_client(sim, client, round_seed(cfg.seed, 1, client.cid))}, repeats)
    return n / best["plain"], n / best["sim"]


def peak_rss_child(model_name: str, clients: int) -> None:
    from fedlora.app.experiment import RunConfig, run_experiment

    # Every client trains once, so every client holds its private B and head at the end.
    cfg = RunConfig(model=model_name, method="fedsa", clients=clients, rounds=1, local_steps=1, batch_size=8,
                    fraction=1.0, examples_per_client=20, test_examples=100, partition="iid")
    run_experiment(cfg)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(model_name: str, clients: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", model_name, str(clients)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        peak_rss_child(args.child[0], int(args.child[1]))
        return
    model = "tiny:bert" if args.quick else "minilm"
    steps, repeats = (10, 3) if args.quick else (12, 3)
    plain, sim = throughput(model, steps, repeats)
    print(f"## Simulator overhead ({model}, batch 16, {steps} steps, best of {repeats})\n")
    print("| loop | examples/s |\n|---|---|")
    print(f"| plain PEFT loop (reference) | {plain:.1f} |\n| fedlora simulator: load state, train, upload | {sim:.1f} |")
    print(f"\nratio simulator / plain = **{sim / plain:.2f}** (target ≥ 0.9)\n")
    small, large = peak_rss(model, 2), peak_rss(model, 100)
    print(f"## Memory: peak RSS of a fedsa run ({model})\n")
    print("| clients | peak RSS MB |\n|---|---|")
    print(f"| 2 (reference) | {small:.0f} |\n| 100 | {large:.0f} |")
    print(f"\nratio 100 / 2 clients = **{large / small:.2f}** (target ≤ 1.3)")


if __name__ == "__main__":
    main()
