"""Local-training throughput and memory with example-level DP (DP-SGD with Opacus) against the same training
without it, in the same run: one client's local steps as the simulator runs them (load state, train, upload).

    python benchmarks/bench_privacy.py            # MiniLM-L6 (offline default), LoRA r = 8, batch 16
    python benchmarks/bench_privacy.py --quick    # tiny random BERT, seconds

It also times the per-client accounting the simulator does after every round (each client's ε from its ledger of
one (z, q, steps) entry per round it trained) against Opacus's accountant handed that ledger entry by entry, the
reference, at a few ledger lengths.

Throughput is examples per second, best of ``--repeats`` interleaved runs (under DP-SGD a step's batch is a Poisson
draw of expected size 16, so examples are counted as steps × 16 on both sides). Peak memory is each side's
resident-set high-water mark in its own subprocess (``ru_maxrss``), after one warm-up turn and the timed turns.
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

from _reference import best_seconds, simulated_client  # noqa: E402


def config(model: str, steps: int, dp: str):
    from fedlora.app.experiment import RunConfig

    return RunConfig(model=model, clients=1, rounds=1, local_steps=steps, batch_size=16, partition="iid", examples_per_client=steps * 16 + 40,
                     test_examples=50, method="fedit", device="cpu", dp=dp, dp_clip=1.0, dp_noise=1.0)


def throughputs(model: str, steps: int, repeats: int) -> dict[str, float]:
    from fedlora.app.experiment import build
    from fedlora.federation.simulator import round_seed

    sims = {dp: build(config(model, steps, dp)).simulator for dp in ("none", "example")}
    fns = {dp: (lambda s=s: simulated_client(s, s.clients[0], round_seed(0, 1, 0))) for dp, s in sims.items()}
    best = best_seconds(fns, repeats)
    return {dp: steps * 16 / t for dp, t in best.items()}


def peak_child(model: str, steps: int, dp: str) -> None:
    from fedlora.app.experiment import build
    from fedlora.federation.simulator import round_seed

    sim = build(config(model, steps, dp)).simulator
    for _ in range(2):
        simulated_client(sim, sim.clients[0], round_seed(0, 1, 0))
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def accounting(rounds: tuple[int, ...], repeats: int) -> list[tuple[int, float, float, float]]:
    """(rounds, seconds of fedlora's ε, seconds of the entry-by-entry reference, |relative difference|) per length."""
    from opacus.accountants import create_accountant

    from fedlora.federation.privacy import ClientAccountants, PrivacyConfig

    out = []
    for r in rounds:
        ledger = ClientAccountants(PrivacyConfig(mode="example", clip=1.0, noise=1.0))
        for _ in range(r):
            ledger.spend(0, 0.1, 3)

        def reference(ledger=ledger):
            acc = create_accountant("rdp")
            acc.history = list(ledger.history[0])
            return acc.get_epsilon(delta=1e-5)

        times = {name: _best(fn, repeats) for name, fn in (("ours", lambda ledger=ledger: ledger.epsilon(0)), ("ref", reference))}
        out.append((r, times["ours"][0], times["ref"][0], abs(times["ours"][1] / times["ref"][1] - 1)))
    return out


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best seconds of ``fn`` and its value, each call with fedlora's ε cache emptied first (a round's fresh cost)."""
    import time

    from fedlora.federation.privacy import _accountant_epsilon

    best, value = float("inf"), None
    for _ in range(repeats):
        _accountant_epsilon.cache_clear()
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def round_accounting(clients: int, rounds: int, repeats: int) -> tuple[float, float]:
    """Seconds of one round's ε for every client (equal shards, every client trained every round): fedlora's
    ledger against one accountant call per client (the merged ledger, uncached: the reference)."""
    from opacus.accountants import create_accountant

    from fedlora.federation.privacy import ClientAccountants, PrivacyConfig

    ledger = ClientAccountants(PrivacyConfig(mode="example", clip=1.0, noise=1.0))
    for _ in range(rounds):
        for cid in range(clients):
            ledger.spend(cid, 0.1, 3)

    def reference():
        out = {}
        for cid in range(clients):
            acc = create_accountant("rdp")
            acc.history = [(1.0, 0.1, 3 * rounds)]
            out[cid] = acc.get_epsilon(delta=1e-5)
        return out

    ours, a = _best(lambda: {cid: ledger.epsilon(cid) for cid in range(clients)}, repeats)
    ref, b = _best(reference, repeats)
    assert all(abs(a[c] / b[c] - 1) < 1e-12 for c in range(clients))
    return ours, ref


def peak(model: str, steps: int, dp: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", model, str(steps), dp], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        peak_child(args.child[0], int(args.child[1]), args.child[2])
        return
    model = "tiny:bert" if args.quick else "minilm"
    steps = 10 if args.quick else 8
    eps = throughputs(model, steps, args.repeats)
    mem = {dp: peak(model, steps, dp) for dp in ("none", "example")}
    print(f"command: python benchmarks/bench_privacy.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"\n## Example-level DP: one client's local training ({model}, LoRA r = 8, batch 16, {steps} steps, best of {args.repeats})\n")
    print("| local training | examples/s | peak RSS MB |\n|---|---:|---:|")
    print(f"| without DP (reference) | {eps['none']:.1f} | {mem['none']:.0f} |")
    print(f"| DP-SGD (Opacus: per-example gradients, clip, noise) | {eps['example']:.1f} | {mem['example']:.0f} |")
    print(f"\nthroughput DP / plain = **{eps['example'] / eps['none']:.2f}**, peak memory DP / plain = **{mem['example'] / mem['none']:.2f}**")
    print("\n## Accounting: one client's ε after R rounds (z = 1, q = 0.1, 3 steps a round; RDP), best of "
          f"{args.repeats}\n")
    print("| rounds in the ledger | fedlora ms | Opacus, one entry per round (reference) ms | reference / fedlora | ε rel. difference |")
    print("|---:|---:|---:|---:|---:|")
    for r, ours, ref, diff in accounting((1, 10, 60) if args.quick else (1, 10, 60, 200), args.repeats):
        print(f"| {r} | {ours * 1e3:.0f} | {ref * 1e3:.0f} | {ref / ours:.1f}× | {diff:.1e} |")
    clients = 20 if args.quick else 100
    ours, ref = round_accounting(clients, 10, args.repeats)
    print(f"\nOne round's ε for all {clients} clients (equal shards, 10 rounds each): fedlora {ours * 1e3:.0f} ms, "
          f"one accountant call per client (reference) {ref * 1e3:.0f} ms, reference / fedlora = **{ref / ours:.0f}×**")


if __name__ == "__main__":
    main()
