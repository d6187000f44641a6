"""Causal-LM local training inside the simulator vs a plain PEFT loop, on the same model, batches and steps.

1. Throughput (examples/s), interleaved in one process, best of N: the simulator's client turn (load the
   client's state into the shared model, ``train_local``, read back the upload) against a plain PEFT loop (one
   model, AdamW, the same batches in the same order, the same loss function). Target ratio simulator / plain
   ≥ 0.9. Two more rows for context: the plain loop with transformers' own loss (``model(**batch).loss``, which
   computes logits at every position, where fedlora's loss runs the LM head only where a response token is
   predicted), and the simulator with gradient checkpointing on.
2. Peak memory: the RSS high-water mark (VmHWM) of each loop in its own subprocess, reset after loading the
   data and model (``/proc/self/clear_refs``), so it is the training's own peak; also the RSS before training.

Threads: one intra-op thread by default (``--threads``): on a machine shared with other jobs, OpenMP threads
spinning against each other make timings swing by 10× and more; the ratios are what the script is for.

    python benchmarks/bench_causal_lm.py            # SmolLM2-135M-Instruct (offline default), ~5 min on 2 busy cores
    python benchmarks/bench_causal_lm.py --quick    # tiny random Llama, about 2 minutes
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

KINDS = ("plain", "plain-hf", "sim", "sim+ckpt")


def setup(model_name: str, steps: int, batch: int):
    from transformers.utils import logging as hf_logging

    from fedlora.app.experiment import RunConfig, build
    from fedlora.app.models import set_checkpointing
    from fedlora.federation.simulator import round_seed

    hf_logging.disable_progress_bar()

    cfg = RunConfig(task="causal-lm", model=model_name, clients=1, rounds=1, local_steps=steps, batch_size=batch,
                    partition="iid", examples_per_client=int(steps * batch / 0.8) + 5, test_examples=10, method="fedit",
                    device="cpu", max_length=128)
    exp = build(cfg)
    sim, client = exp.simulator, exp.simulator.clients[0]
    seed = round_seed(cfg.seed, 1, client.cid)
    base = sim.model.get_base_model()

    def plain_loop(hf_loss: bool = False) -> None:
        loss = (lambda model, b: model(**b, use_cache=False).loss) if hf_loss else sim.task.loss
        plain_peft_loop(sim.model, client.train, steps=steps, batch=batch, lr=cfg.lr, seed=seed, loss=loss)

    def simulated() -> None:
        simulated_client(sim, client, seed)

    def checkpointed() -> None:  # what --gradient-checkpointing does
        set_checkpointing(base, True)
        try:
            simulated()
        finally:
            set_checkpointing(base, False)

    fns = {"plain": plain_loop, "plain-hf": lambda: plain_loop(hf_loss=True), "sim": simulated, "sim+ckpt": checkpointed}
    return fns, steps * batch


def throughput(model_name: str, steps: int, batch: int, repeats: int) -> dict[str, float]:
    fns, n = setup(model_name, steps, batch)
    best = best_seconds({k: fns[k] for k in KINDS}, repeats)
    return {k: n / v for k, v in best.items()}


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_child(kind: str, model_name: str, steps: int, batch: int) -> None:
    import gc

    fns, _ = setup(model_name, steps, batch)
    gc.collect()
    loaded = _status_mb("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux ≥ 4.0), so the peak is the training's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    fns[kind]()
    peak = _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loaded_mb": loaded or float("nan"), "maxrss_mb": peak}))


def peak_rss(kind: str, model_name: str, steps: int, batch: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--child", kind, model_name, str(steps), str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODEL", "STEPS", "BATCH"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        kind, model, steps, batch = args.child
        peak_rss_child(kind, model, int(steps), int(batch))
        return
    model = "tiny:llama" if args.quick else "smollm2"
    steps = args.steps or (40 if args.quick else 4)
    batch = args.batch or 4
    speed = throughput(model, steps, batch, args.repeats)
    memory = {k: peak_rss(k, model, steps, batch, args.threads) for k in KINDS}
    print(f"## Causal-LM local training ({model}, offline tweets-as-instructions, batch {batch}, {steps} steps, "
          f"max length 128, {args.threads} thread(s), best of {args.repeats}, interleaved)\n")
    print("| loop | examples/s | ratio to plain | RSS before training MB | peak RSS in training MB |\n|---|---|---|---|---|")
    names = {"plain": "plain PEFT loop, same loss (reference)", "plain-hf": "plain PEFT loop, `model(**batch).loss`",
             "sim": "fedlora simulator: load state, train_local, upload", "sim+ckpt": "fedlora simulator, gradient checkpointing"}
    for k in KINDS:
        print(f"| {names[k]} | {speed[k]:.2f} | {speed[k] / speed['plain']:.2f} | {memory[k]['loaded_mb']:.0f} | {memory[k]['maxrss_mb']:.0f} |")
    print(f"\nratio simulator / plain = **{speed['sim'] / speed['plain']:.2f}** (target ≥ 0.9); "
          f"peak RSS simulator / plain = **{memory['sim']['maxrss_mb'] / memory['plain']['maxrss_mb']:.2f}**")


if __name__ == "__main__":
    main()
