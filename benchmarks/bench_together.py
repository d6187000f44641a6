"""Simulator throughput with the round's clients trained together vs one after another, measured in the same run,
and the peak memory of a round of many clients trained together against a round of 2 (issue 30).

Throughput: one round's client turns (local training and each client's local scoring; the server step is the same
either way and left out) for U clients per round, ``--clients-together off`` then ``on`` on the same simulator,
interleaved best of ``--repeats``; examples/s = U · local steps · batch / seconds.

Memory (``--memory``): each case in its own subprocess, one round of fedit with every client trained together;
on CUDA ``torch.cuda.max_memory_allocated``, on a CPU the peak RSS. The adapter state of U clients (their
trainables, gradients and AdamW's two moments: 4 × the trainable bytes each) is subtracted from the large case:
target (peak(U) − state(U)) / peak(2) ≤ 1.3.

    python benchmarks/bench_together.py --models minilm smollm2 --clients 10 100 --device cuda   # the GPU table
    python benchmarks/bench_together.py --shapes --device cuda   # the same without the model and data packages
    nice -n 10 python benchmarks/bench_together.py --models tiny:bert minilm --clients 4 --local-steps 2   # a CPU minute
    python benchmarks/bench_together.py --memory --models tiny:bert --clients 2 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAUSAL = ("smollm2", "tiny:llama")


def config(model: str, clients: int, args):
    from fedlora.app.experiment import RunConfig

    task = dict(task="causal-lm", max_new_tokens=4) if model in CAUSAL else {}
    return RunConfig(model=model, clients=clients, rounds=1, fraction=1.0, local_steps=args.local_steps, batch_size=args.batch_size,
                     examples_per_client=args.examples, test_examples=20, max_length=args.max_length, partition="iid",
                     method="fedit", device=args.device, local_test_fraction=0.0, clients_together_group=args.group, **task)


def shapes_model(model: str):
    """(model, task type, target modules, causal) of ``model``'s architecture with random weights: timing needs the
    shapes, not the weights, and a GPU machine without this project's model packages can build them."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    if model in CAUSAL:  # SmolLM2-135M's config
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=2)
        return LlamaForCausalLM(cfg), "CAUSAL_LM", ("q_proj", "v_proj"), True
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     max_position_embeddings=512, num_labels=3)  # all-MiniLM-L6-v2's
    return BertForSequenceClassification(cfg), "SEQ_CLS", ("query", "value"), False


def shapes_split(causal: bool, n: int, width: int, vocab: int, gen):
    """``n`` random examples of lengths in [width/4, width], right-padded (causal: the second half is the response)."""
    import torch

    from fedlora.federation import CausalLMSplit, TokenizedSplit
    from fedlora.federation.causal_lm import IGNORE

    lengths = torch.randint(max(2, width // 4), width + 1, (n,), generator=gen)
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, 2))
    if not causal:
        return TokenizedSplit(ids, mask, torch.randint(0, 3, (n,), generator=gen))
    labels = torch.where(mask.bool() & (torch.arange(width)[None, :] >= lengths[:, None] // 2), ids, torch.full_like(ids, IGNORE))
    return CausalLMSplit(ids, mask, labels, ids[:, : width // 2].clone(), lengths // 2, [""] * n, [""] * n, 2)


def shapes_simulator(model: str, clients: int, args):
    """A simulator of ``clients`` clients on ``model``'s architecture (random weights, random tokens), fedit, LoRA r=8."""
    import peft
    import torch

    from fedlora.adapters import AdapterHandle, AdapterSpec
    from fedlora.federation import ClassificationTask, FederationConfig, SimClient, Simulator, make_method
    from fedlora.federation.causal_lm import CausalLMTask

    torch.manual_seed(0)
    net, task_type, targets, causal = shapes_model(model)
    spec = AdapterSpec(kind="lora", r=8, alpha=16.0, target_modules=targets)
    net = peft.get_peft_model(net, spec.peft_config(task_type))
    gen = torch.Generator().manual_seed(0)
    vocab = net.config.vocab_size
    split = lambda n: shapes_split(causal, n, args.max_length, vocab, gen)  # noqa: E731
    sims = [SimClient(u, split(args.examples), split(0)) for u in range(clients)]
    fcfg = FederationConfig(rounds=1, local_steps=args.local_steps, batch_size=args.batch_size, device=args.device,
                            together_group=args.group)
    task = CausalLMTask(None) if causal else ClassificationTask()
    return Simulator(net, AdapterHandle(net, spec), make_method("fedit"), sims, split(4), fcfg, task=task)


def simulator(model: str, clients: int, args):
    if args.shapes:
        return shapes_simulator(model, clients, args)
    from fedlora.app.experiment import build

    return build(config(model, clients, args)).simulator


def turns_seconds(sim, mode: str) -> float:
    """One round's client turns with ``--clients-together mode`` (the server step left out)."""
    sim.config = dataclasses.replace(sim.config, clients_together=mode)
    selected = list(range(len(sim.clients)))
    sync()
    t = time.perf_counter()
    results, failed = sim._turns(1, selected)
    sync()
    assert not failed and sim.together_ran == (mode == "on"), failed
    return time.perf_counter() - t


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(model: str, clients: int, args) -> tuple[float, float]:
    sim = simulator(model, clients, args)
    turns_seconds(sim, "on")  # warm-up (and the dropout probe)
    best = {"off": float("inf"), "on": float("inf")}
    for _ in range(args.repeats):
        for mode in best:
            best[mode] = min(best[mode], turns_seconds(sim, mode))
    n = clients * args.local_steps * args.batch_size
    return n / best["off"], n / best["on"]


def memory_child(model: str, clients: int, args) -> None:
    import torch

    sim = simulator(model, clients, args)
    sim.config = dataclasses.replace(sim.config, clients_together="on")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sim._turns(1, list(range(clients)))
    state = 4 * clients * sum(t.numel() * t.element_size() for t in sim.global_tensors.values())
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "state": state}))


def memory(model: str, clients: int, args) -> dict:
    argv = [sys.executable, __file__, "--child", model, str(clients)] + [a for a in sys.argv[1:] if a != "--memory"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 100], help="clients per round")
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=64, help="training examples per client")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--group", type=int, default=32, help="--clients-together-group")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", action="store_true", help="peak memory of the largest --clients against the smallest instead")
    ap.add_argument("--shapes", action="store_true", help="minilm and smollm2 as their architectures with random weights and random "
                    "tokens (no model or data packages needed; timing and memory only)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.child:
        memory_child(args.child[0], int(args.child[1]), args)
        return
    import torch

    shape = f"batch {args.batch_size}, {args.local_steps} local steps, max length {args.max_length}, groups of {args.group}"
    shape = ("random weights and tokens, " if args.shapes else "") + shape
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    if args.memory:
        small, large = min(args.clients), max(args.clients)
        print(f"## Peak memory, clients trained together ({device}; {shape})\n")
        print("| model | peak, 2 clients MB | peak, U clients MB | adapter state of U MB | (peak(U) − state) / peak(2) |\n|---|---|---|---|---|")
        for model in args.models:
            a, b = memory(model, small, args), memory(model, large, args)
            ratio = (b["peak"] - b["state"]) / a["peak"]
            print(f"| {model} (U = {large}, vs {small}) | {a['peak'] / 2**20:.0f} | {b['peak'] / 2**20:.0f} | {b['state'] / 2**20:.1f} | "
                  f"**{ratio:.2f}** (target ≤ 1.3) |")
        return
    print(f"## Simulator throughput, clients together vs one after another ({device}; {shape}; best of {args.repeats})\n")
    print("| model | clients per round | one after another, examples/s | together, examples/s | ratio |\n|---|---|---|---|---|")
    for model in args.models:
        for clients in args.clients:
            seq, tog = throughput(model, clients, args)
            print(f"| {model} | {clients} | {seq:.1f} | {tog:.1f} | **{tog / seq:.2f}×** |", flush=True)


if __name__ == "__main__":
    main()
