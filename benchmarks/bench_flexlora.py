"""FlexLoRA's server step: fedlora's factor-space SVD against the reference's dense ΔW* and full SVD.

    python benchmarks/bench_flexlora.py                    # 32 layers × (q_proj, v_proj), 4096×4096, U = 10, ranks 4/8/16
    python benchmarks/bench_flexlora.py --quick            # 512×512, 4 layers: a smoke run of a few seconds
    python benchmarks/bench_flexlora.py --ref-matrices 2   # time the dense reference on 2 matrices instead of 4
    python benchmarks/bench_flexlora.py --threads 1        # on a shared machine: one core, no thread hand-offs

Clients of different ranks: client u has r_u = (4, 8, 16)[u % 3], LoRA scale s_u = α/r_u with α = 16, random
seeded factors B_u (d×r_u), A_u (r_u×k), weights n_u / Σn with random n_u. The server computes
``ΔW* = Σ_u w_u s_u B_u A_u`` and sends client u the rank-r_u truncation of its SVD.

* fedlora: ``aggregate_model("flexlora", ..., scales=...)`` for all modules (its default: modules in parallel,
  one per torch thread), and ``aggregate("flexlora", ...)`` on single matrices. It works on Gram matrices of
  the stacked factors and an eigendecomposition of a (Σr_u)² core; nothing d×k is formed.
* reference (FlexLoRA's public code): per matrix, ΔW* formed densely (one (d×Σr_u)·(Σr_u×k) GEMM of the
  stacked, weighted and scaled factors: the fastest dense formation, kinder to the reference than its per-client
  loop), ``torch.linalg.svd(ΔW*, full_matrices=False)``, then each client's slice
  ``B = U_r Σ_r^{1/2} / √s_u``, ``A = Σ_r^{1/2} V_rᵀ / √s_u``. A full 4096² SVD costs about 16 s on 2 quiet
  cores (over a minute while other jobs compete for them), so the reference is timed on ``--ref-matrices`` matrices only and its whole-model time is that
  per-matrix median × the number of matrices: extrapolated, and the table says so.

Per-matrix rows compare like with like, measured in the same run: fedlora's ``aggregate`` on the same
matrices, ``--repeats`` times around each reference call (interleaved), median wall and CPU seconds
(``time.process_time``, all threads). On a machine shared with other jobs read the CPU-time ratio. The
correctness check compares, on the first timed matrix, each client's ``s_u·B·A`` from fedlora with the
reference's rank-r_u truncation ``U_r Σ_r V_rᵀ`` (relative Frobenius error, computed in float64).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedlora.aggregation import aggregate, aggregate_model  # noqa: E402

RANKS = (4, 8, 16)
ALPHA = 16.0


def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")]


def make_uploads(names, d, k, U, seed):
    """Per-client dicts of random factors at ranks (4, 8, 16)[u % 3]; scales α/r_u; weights n_u / Σn."""
    g = torch.Generator().manual_seed(seed)
    ranks = [RANKS[u % len(RANKS)] for u in range(U)]
    Bs = [{} for _ in range(U)]
    As = [{} for _ in range(U)]
    for name in names:
        for u, r in enumerate(ranks):
            Bs[u][name] = torch.randn(d, r, generator=g)
            As[u][name] = torch.randn(r, k, generator=g)
    n = torch.randint(50, 500, (U,), generator=g).double()
    scales = [ALPHA / r for r in ranks]
    return Bs, As, n / n.sum(), scales, ranks


def reference(Bs, As, w, scales, ranks):
    """FlexLoRA's public recipe for one matrix: dense ΔW*, full SVD, every client's slice of it."""
    coef = [float(c) * s for c, s in zip(w, scales)]
    B_cat = torch.cat([B * c for B, c in zip(Bs, coef)], dim=1)
    A_cat = torch.cat(As, dim=0)
    dW = B_cat @ A_cat  # d×k
    t_dense = time.perf_counter()
    U_, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    root = S.sqrt()
    clients = [((U_[:, :r] * root[:r]) / math.sqrt(s), (root[:r, None] * Vh[:r]) / math.sqrt(s)) for r, s in zip(ranks, scales)]
    return (U_, S, Vh), clients, t_dense


def fedlora_one(Bs, As, w, scales):
    return aggregate("flexlora", Bs, As, w, scales=scales)


def timed(fn, *args, **kwargs):
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0, t0


def check(agg, svd, scales, ranks):
    """Relative Frobenius error of each client's s_u·B·A (fedlora) against U_r Σ_r V_rᵀ (reference), float64."""
    U_, S, Vh = (t.double() for t in svd)
    errs = {}
    for (B, A), r, s in zip(agg.clients, ranks, scales):
        if r in errs:  # clients of the same rank receive the same product s_u·B·A
            continue
        truth = (U_[:, :r] * S[:r]) @ Vh[:r]
        mine = s * (B.double() @ A.double())
        errs[r] = float(torch.linalg.matrix_norm(mine - truth) / torch.linalg.matrix_norm(truth))
        del truth, mine
    r_max = max(ranks)
    truth = (U_[:, :r_max] * S[:r_max]) @ Vh[:r_max]
    glob = float(torch.linalg.matrix_norm(agg.B.double() @ agg.A.double() - truth) / torch.linalg.matrix_norm(truth))
    gaps = {r: float((S[r - 1] - S[r]) / S[0]) for r in sorted(errs)}
    return errs, glob, gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512×512, 4 layers, 2 reference matrices")
    ap.add_argument("--dim", type=int, help="d = k of every adapted matrix (default 4096; --quick 512)")
    ap.add_argument("--layers", type=int, help="transformer layers, two adapted matrices each (default 32; --quick 4)")
    ap.add_argument("--clients", type=int, default=10, help="U (default 10)")
    ap.add_argument("--ref-matrices", type=int, default=4, help="matrices the dense reference is timed on (default 4)")
    ap.add_argument("--repeats", type=int, help="fedlora timings per matrix and of the whole model (default 5; --quick 3)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = k = args.dim or (512 if args.quick else 4096)
    layers = args.layers or (4 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    names = module_names(layers)
    n_ref = max(1, min(args.ref_matrices, len(names)))
    U = args.clients

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average before start {os.getloadavg()[0]:.2f}")
    print(f"command: python benchmarks/bench_flexlora.py {' '.join(sys.argv[1:])}".rstrip())
    Bs, As, w, scales, ranks = make_uploads(names, d, k, U, args.seed)
    print(f"{len(names)} matrices of {d}×{k} float32, U = {U}, ranks {ranks} (Σr_u = {sum(ranks)}), α = {ALPHA:g}, "
          f"s_u = α/r_u\n", flush=True)

    def one(name):
        return [B[name] for B in Bs], [A[name] for A in As]

    # Warm-up: first-call costs (LAPACK loading, workspace queries, the thread pool) are not the method's.
    small = [B[names[0]][:64] for B in Bs], [A[names[0]][:, :64] for A in As]
    reference(*small, w, scales, ranks)
    fedlora_one(*one(names[0]), w, scales)
    aggregate_model("flexlora", Bs, As, w, scales=scales)

    mine, mine_cpu, ref, ref_cpu, ref_dense = [], [], [], [], []
    first = None
    for i, name in enumerate(names[:n_ref]):
        b, a = one(name)
        for _ in range(repeats // 2):
            _, s, c, _ = timed(fedlora_one, b, a, w, scales)
            mine.append(s)
            mine_cpu.append(c)
        (svd, _, t_dense), s, c, t0 = timed(reference, b, a, w, scales, ranks)
        ref.append(s)
        ref_cpu.append(c)
        ref_dense.append(t_dense - t0)
        print(f"  {name}: reference {s:.2f}s wall ({t_dense - t0:.2f}s of it forming ΔW*), {c:.2f}s CPU", file=sys.stderr, flush=True)
        for _ in range(repeats - repeats // 2):
            agg, s, c, _ = timed(fedlora_one, b, a, w, scales)
            mine.append(s)
            mine_cpu.append(c)
        print(f"  {name}: fedlora median {statistics.median(mine[-repeats:]):.4f}s wall", file=sys.stderr, flush=True)
        if i == 0:
            first = check(agg, svd, scales, ranks)
        del svd, agg
        gc.collect()

    model, model_cpu = [], []
    for _ in range(repeats):
        _, s, c, _ = timed(aggregate_model, "flexlora", Bs, As, w, scales=scales)
        model.append(s)
        model_cpu.append(c)
        print(f"  aggregate_model, {len(names)} matrices: {s:.3f}s wall, {c:.3f}s CPU", file=sys.stderr, flush=True)

    m, mc = statistics.median(mine), statistics.median(mine_cpu)
    r, rc = statistics.median(ref), statistics.median(ref_cpu)
    mm, mmc = statistics.median(model), statistics.median(model_cpu)
    n = len(names)
    print(f"\n### FlexLoRA server step: {layers} layers × (q_proj, v_proj) = {n} matrices of {d}×{k}, U = {U}, "
          f"ranks 4/8/16, float32\n")
    print(f"Per matrix: median over {n_ref} matrices (fedlora: {repeats} runs each, interleaved with the reference's one). "
          f"Whole model: fedlora's `aggregate_model` measured (median of {repeats}); the reference's is its per-matrix "
          f"median × {n}, **extrapolated from {n_ref} matrices**.\n")
    print(f"| approach | s per matrix | CPU s per matrix | × reference | × reference (CPU) | s for {n} matrices | × reference ({n}) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| fedlora factor-space SVD | {m:.4f} | {mc:.4f} | {m / r:.5f} | {mc / rc:.5f} | {mm:.3f} (measured) | {mm / (r * n):.5f} |")
    print(f"| reference: dense ΔW* + full SVD | {r:.3f} | {rc:.3f} | 1.000 | 1.000 | {r * n:.1f} (extrapolated from {n_ref}) | 1.000 |")
    print(f"\nOf the reference's per-matrix wall time, forming ΔW* densely took {statistics.median(ref_dense):.3f} s (median); "
          f"the rest is the SVD and the slicing. fedlora's whole-model CPU s: {mmc:.3f}.")

    errs, glob, gaps = first
    print(f"\n### Correctness on {names[0]}: fedlora's s_u·B·A against the reference's rank-r_u truncation U_r Σ_r V_rᵀ "
          f"(float32 uploads, compared in float64)\n")
    print("| r_u | relative Frobenius error | (σ_r − σ_{r+1})/σ_1 |")
    print("|---:|---:|---:|")
    for rank in sorted(errs):
        print(f"| {rank} | {errs[rank]:.2e} | {gaps[rank]:.3f} |")
    print(f"| {max(ranks)} (global B̂Â) | {glob:.2e} | {gaps[max(ranks)]:.3f} |")


if __name__ == "__main__":
    main()
