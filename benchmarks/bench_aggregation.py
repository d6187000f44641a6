"""Server-side cost and accuracy of every aggregation method on LLaMA-2-7B-shaped adapters.

    python benchmarks/bench_aggregation.py            # 32 layers × (q_proj, v_proj), 4096×4096, r = 16, U ∈ {10, 50}
    python benchmarks/bench_aggregation.py --quick    # 2 layers, U ∈ {4, 10}: a smoke run of a few seconds
    python benchmarks/bench_aggregation.py --threads 1   # on a shared machine: one core, no thread hand-offs

Prints two markdown tables.

1. Cost. Wall-clock and CPU seconds (``time.process_time``, all threads) to aggregate the whole model
   (``aggregate_model``: validation included), each the median over ``--repeats`` interleaved runs, and
   their ratio to forming the ideal update ``ΔW* = Σ w_u B_u A_u`` densely for every module once (one
   (d×Ur)·(Ur×k) GEMM per module, the fastest dense formation), measured in the same run. On a machine
   shared with other jobs the CPU-time ratio is the trustworthy one: wall time then includes waiting for
   the CPU, which penalises many short operations more than one long GEMM. Peak extra memory is the kernel's resident-set high-water
   mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each run) minus the resident set just
   before the run, in MiB: it counts everything torch and LAPACK touch, including the result itself
   (``flora`` and ``fedex`` return stacked factors as large as the uploads). "Largest tensor" is the
   biggest tensor any aten op returns while aggregating one module (a ``TorchDispatchMode`` trace), in
   elements, against d·k = 16,777,216.
2. Divergence ρ = ‖ΔW* − ΔŴ‖/‖ΔW*‖ (mean over ``--div-modules`` modules) for FedIT, FLoRA-NA, SVD and the
   Eckart–Young bound, on factors that drift from a common start: ``B_u = B0 + ε·N``, ``A_u = A0 + ε·N``
   with ``B0``, ``A0`` of unit-scale entries (scale-free: ρ depends on ε only), and round one, where
   ``B0 = 0`` so each ``B_u`` is its client's own update.

Uploads are generated once per U and shared by all methods (``ffa``, ``rolora``, ``fedsvd``, and ``fedsb``/``ravan``
(their clients' B·C_u over the shared bases) get one shared A per module; ``fedsa``
gets only the As, as its clients upload no B). Weights are n_u / Σn with random n_u.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedlora.aggregation import (  # noqa: E402
    METHODS,
    aggregate,
    aggregate_model,
    divergence,
    eckart_young_bound,
)

D = K = 4096
RANK = 16


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")]


def make_uploads(names, U, eps, seed, *, round_one=False):
    """Per-client dicts of factors drifting from a common start (no extra copies of the uploads)."""
    g = torch.Generator().manual_seed(seed)
    Bs = [{} for _ in range(U)]
    As = [{} for _ in range(U)]
    shared_A = {}
    for name in names:
        B0 = torch.zeros(D, RANK) if round_one else torch.randn(D, RANK, generator=g)
        A0 = torch.randn(RANK, K, generator=g)
        shared_A[name] = A0
        for u in range(U):
            Bs[u][name] = torch.randn(D, RANK, generator=g).mul_(eps).add_(B0)
            As[u][name] = torch.randn(RANK, K, generator=g).mul_(eps).add_(A0)
    n = torch.randint(50, 500, (U,), generator=g).double()
    return Bs, As, shared_A, n / n.sum()


def dense_ideal(Bs, As, w, names):
    for name in names:
        B_cat = torch.cat([B[name] * float(c) for B, c in zip(Bs, w)], dim=1)
        A_cat = torch.cat([A[name] for A in As], dim=0)
        out = B_cat @ A_cat  # d×k
        del out


def run_method(method, Bs, As, shared_A, w, names):
    if method == "dense ΔW*":
        return dense_ideal(Bs, As, w, names)
    if method in ("ffa", "rolora", "fedsvd", "fedsb", "ravan"):  # A frozen, the same on every client (rolora: a B-round)
        As = [shared_A] * len(As)
    if method == "fedsa":
        Bs = None
    return aggregate_model(method, Bs, As, w)


def measure(method, *args):
    gc.collect()
    before = vm_kib("VmRSS")
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_method(method, *args)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = vm_kib("VmHWM")
    del res
    gc.collect()
    return seconds, cpu, max(peak - before, 0) / 1024


def largest_tensor(method, Bs, As, shared_A, w, name):
    one_B = [{name: B[name]} for B in Bs]
    one_A = [{name: A[name]} for A in As]
    with LargestTensor() as rec:
        run_method(method, one_B, one_A, {name: shared_A[name]}, w, [name])
    return rec.numel


def cost_table(U_list, layers, repeats, seed):
    names = module_names(layers)
    rows = []
    methods = ["dense ΔW*", *METHODS]
    for U in U_list:
        Bs, As, shared_A, w = make_uploads(names, U, eps=0.2, seed=seed)
        times = {m: [] for m in methods}
        cpus = {m: [] for m in methods}
        peaks = {m: 0.0 for m in methods}
        one = names[0]
        for m in methods:  # warm-up: first-call costs (imports, LAPACK workspace queries) are not the method's
            run_method(m, [{one: B[one]} for B in Bs], [{one: A[one]} for A in As], {one: shared_A[one]}, w, [one])
        for _ in range(repeats):
            for m in methods:
                s, cpu, mib = measure(m, Bs, As, shared_A, w, names)
                times[m].append(s)
                cpus[m].append(cpu)
                peaks[m] = max(peaks[m], mib)
                print(f"  U={U} {m}: {s:.3f}s wall, {cpu:.3f}s CPU, +{mib:.0f} MiB", file=sys.stderr, flush=True)
        dense, dense_cpu = statistics.median(times["dense ΔW*"]), statistics.median(cpus["dense ΔW*"])
        for m in methods:
            t, cpu = statistics.median(times[m]), statistics.median(cpus[m])
            big = largest_tensor(m, Bs, As, shared_A, w, names[0])
            rows.append((U, m, t, t / dense, cpu, cpu / dense_cpu, peaks[m], big))
        iters = aggregate_model("florana", [{n: B[n] for n in names[:4]} for B in Bs],
                                [{n: A[n] for n in names[:4]} for A in As], w)
        sweeps = [a.info["iterations"] for a in iters.layers.values()]
        print(f"  U={U}: florana sweeps on the first 4 modules: {sweeps}", file=sys.stderr, flush=True)
        del Bs, As, shared_A
        gc.collect()
    print(f"\n### Cost: {layers} layers × (q_proj, v_proj) = {len(names)} matrices of {D}×{K}, r = {RANK}, float32\n")
    print("| U | method | wall s (whole model) | × dense | CPU s | × dense (CPU) | peak extra MiB | largest tensor |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for U, m, t, ratio, cpu, cpu_ratio, mib, big in rows:
        flag = " (d×k)" if big >= D * K else ""
        print(f"| {U} | {m} | {t:.3f} | {ratio:.3f} | {cpu:.3f} | {cpu_ratio:.3f} | {mib:.0f} | {big:,}{flag} |")


def factorisation_table(U_list, repeats, seed):
    """Why svd/florana factor the stacked B through its float64 Gram and not a Householder QR."""
    g = torch.Generator().manual_seed(seed)
    print(f"\n### Factorising one stacked factor B_cat ({D}×Ur, float32 uploads): median of {max(repeats, 5)}\n")
    print("| U | dense ΔW* (one module) | Householder QR (geqrf, float32) | float64 Gram (cast + GEMM) | float32 Gram |")
    print("|---:|---:|---:|---:|---:|")
    for U in U_list:
        B_cat = torch.randn(D, U * RANK, generator=g)
        A_cat = torch.randn(U * RANK, K, generator=g)

        def best_of(f):
            times = []
            for _ in range(max(repeats, 5)):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        cols = [best_of(lambda: B_cat @ A_cat), best_of(lambda: torch.geqrf(B_cat)),
                best_of(lambda: (lambda x: x.T @ x)(B_cat.double())), best_of(lambda: B_cat.T @ B_cat)]
        print(f"| {U} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in cols) + " |", flush=True)


def divergence_table(U_list, n_modules, seed):
    names = module_names((n_modules + 1) // 2)[:n_modules]
    regimes = [("round one: B0 = 0, ε = 0.01", True, 0.01), ("drift ε = 0.05", False, 0.05),
               ("drift ε = 0.2", False, 0.2), ("drift ε = 1", False, 1.0)]
    print(f"\n### Divergence ρ (mean over {n_modules} modules of {D}×{K}, r = {RANK})\n")
    print("| U | factors | fedit | florana | svd | Eckart–Young bound |")
    print("|---:|---|---:|---:|---:|---:|")
    for U in U_list:
        for label, round_one, eps in regimes:
            Bs, As, _, w = make_uploads(names, U, eps=eps, seed=seed + 1, round_one=round_one)
            rho = {m: [] for m in ("fedit", "florana", "svd", "bound")}
            for name in names:
                b, a = [B[name] for B in Bs], [A[name] for A in As]
                for m in ("fedit", "florana", "svd"):
                    rho[m].append(divergence(b, a, w, aggregate(m, b, a, w)))
                rho["bound"].append(eckart_young_bound(b, a, w))
            mean = {m: statistics.fmean(v) for m, v in rho.items()}
            print(f"| {U} | {label} | {mean['fedit']:.3e} | {mean['florana']:.3e} | {mean['svd']:.3e} | "
                  f"{mean['bound']:.3e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, U ∈ {4, 10}, one repeat")
    ap.add_argument("--clients", type=int, nargs="+", help="U values (default 10 50)")
    ap.add_argument("--layers", type=int, help="transformer layers (default 32)")
    ap.add_argument("--repeats", type=int, help="interleaved timing repeats (default 3)")
    ap.add_argument("--div-modules", type=int, help="modules in the divergence table (default 4)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    U_list = args.clients or ([4, 10] if args.quick else [10, 50])
    layers = args.layers or (2 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    n_div = args.div_modules or (2 if args.quick else 4)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average before start {os.getloadavg()[0]:.2f}")
    print(f"command: python benchmarks/bench_aggregation.py {' '.join(sys.argv[1:])}".rstrip())
    cost_table(U_list, layers, repeats, args.seed)
    factorisation_table(U_list, repeats, args.seed)
    divergence_table(U_list, n_div, args.seed)


if __name__ == "__main__":
    main()
