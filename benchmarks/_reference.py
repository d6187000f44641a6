"""What the simulator benchmarks measure against, in one place: a plain single-model PEFT training loop, one
client's local training as the simulator does it, and interleaved best-of-N timing. Imported by the
``bench_*.py`` scripts next to it (run as ``python benchmarks/bench_X.py``, so this folder is on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def plain_peft_loop(model, split, *, steps: int, batch: int, lr: float, seed: int, loss: Callable) -> None:
    """What a user would write without fedlora: one PEFT model, AdamW, the same batches in a seeded order,
    gradient clipping at 1 as ``train_local`` does. ``loss(model, batch)`` gives the loss tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    for s in range(steps):
        out = loss(model, split.batch(order[s * batch : (s + 1) * batch]))
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def simulated_client(sim, client, seed: int) -> None:
    """One client's local training as the simulator does it: load its state into the shared model, train
    (``train_local``, the simulator's own loop), read back its trainables and upload. The client's local
    evaluation, which a plain loop does not do, is left out of both sides."""
    from fedlora.federation.simulator import train_local

    sim.handle.set(sim.global_tensors)
    train_local(sim.model, sim.task, client.train, sim.config, seed)
    sim.method.upload(sim.handle, sim.handle.get(), 1)


def best_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds (this machine is noisy), after one
    warm-up call of the first."""
    next(iter(fns.values()))()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for kind, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[kind] = min(best[kind], time.perf_counter() - t)
    return best
