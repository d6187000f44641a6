"""Secure aggregation's cost: a Flower round with SecAgg+ against the same round without it, in the same run.

    python benchmarks/bench_secure.py                 # tiny BERT, LoRA r = 8 on query,value, U = 3, 10, 30 clients
    python benchmarks/bench_secure.py --clients 3,10  # fewer sizes

Both sides run the Flower ServerApp's round against this process's ClientApp through the in-process Grid
(:mod:`fedlora.flower.inline`: every message serialised as on the wire), one local step per client, so the
difference is the protocol: key agreement, Shamir shares, masking and unmasking (the PRG over the whole upload
for each of the client's neighbours). Reported per round (rounds 2 and 3, best of the two): wall time, bytes up per
client, and the largest error of the securely aggregated mean in round 1 against the stated bound Δ·U/Σ ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(cfg, secure: bool, means: list) -> list[dict]:
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation

    with tempfile.TemporaryDirectory() as tmp:
        return run_federation(InlineGrid(cfg), cfg.replace(secure_aggregation=secure, out=f"{tmp}/run"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="3,10,30")
    ap.add_argument("--model", default="tiny:bert")
    args = ap.parse_args()

    import logging

    import torch

    from fedlora.app.experiment import RunConfig, build
    from fedlora.federation.simulator import Simulator
    from fedlora.flower import secure

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    captured: list = []
    original = Simulator.close_round

    def spy(self, results, failed, rnd, started, sec=None):  # the mean the server's rule is given in round 1
        if rnd == 1:
            if sec is not None:
                captured.append({k: v.double() for k, v in sec.mean.items()})
            else:
                w = [r.n_train for r in results]
                captured.append({k: sum(x / sum(w) * (r.upload | r.extras)[k].double() for x, r in zip(w, results))
                                 for k in results[0].upload | results[0].extras})
        return original(self, results, failed, rnd, started, sec)

    Simulator.close_round = spy
    rows = []
    for u in [int(x) for x in args.clients.split(",")]:
        cfg = RunConfig(model=args.model, data="tweets", method="fedit", clients=u, rounds=3, local_steps=1, batch_size=8,
                        examples_per_client=40, test_examples=60, max_length=32, partition="iid", device="cpu", seed=0)
        captured.clear()
        t0 = time.perf_counter()
        plain = run(cfg, False, captured)
        t1 = time.perf_counter()
        sec = run(cfg, True, captured)
        t2 = time.perf_counter()
        n = [len(c.train) for c in build(cfg).simulator.clients]
        bound = secure.error_bound(cfg.secagg_clip, [x / max(n) for x in n])
        err = max(float((captured[1][k] - captured[0][k]).abs().max()) for k in captured[0])
        per_round = {name: min(h["wall_seconds"] for h in hist[1:]) for name, hist in (("plain", plain), ("secure", sec))}
        rows.append((u, per_round["plain"], per_round["secure"], plain[1]["bytes_up"] / u, sec[1]["bytes_up"] / u, err, bound,
                     t1 - t0, t2 - t1))
    print("| clients | plain s/round | SecAgg+ s/round | ratio | plain B up/client | SecAgg+ B up/client | ratio | "
          "max error (round 1) | bound Δ·U/Σratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for u, tp, ts, bp, bs, err, bound, _, _ in rows:
        print(f"| {u} | {tp:.3f} | {ts:.3f} | {ts / tp:.2f}× | {bp:,.0f} | {bs:,.0f} | {bs / bp:.2f}× | {err:.2e} | {bound:.2e} |")


if __name__ == "__main__":
    main()
