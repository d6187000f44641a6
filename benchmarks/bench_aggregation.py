"""Server-side cost and accuracy of every aggregation method on LLaMA-2-7B-shaped adapters.

    python benchmarks/bench_aggregation.py            # 32 layers × (q_proj, v_proj), 4096×4096, r = 16, U ∈ {10, 50}
    python benchmarks/bench_aggregation.py --quick    # 2 layers, U ∈ {4, 10}: a smoke run of a few seconds
    python benchmarks/bench_aggregation.py --threads 1   # on a shared machine: one core, no thread hand-offs
    python benchmarks/bench_aggregation.py --scale    # cross-device scale: U ∈ {10, 100, 1000}, per matrix
    python benchmarks/bench_aggregation.py --scale --device cuda   # the same on a GPU (uploads on the GPU)
    python benchmarks/bench_aggregation.py --batched  # batched vs per-client vs dense ΔW*, U ∈ {10, 100, 1000}, 4096², r = 8
    python benchmarks/bench_aggregation.py --batched --shape 1024 --batched-clients 10 100   # a quick run
    python benchmarks/bench_aggregation.py --batched --device cuda --syncs   # on a GPU, with the solvers' sync counts

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

3. ``--scale`` (instead of 1 and 2): the methods whose server work grows with the number of clients, at U = 10,
   100 and 1000 clients (``--scale-clients``), reported per matrix: U = 10 and 100 on the 32 layers, U = 1000 on
   ``--scale-layers-1000`` layers (4 by default: 8 matrices, 4.2 GB of uploads). Ratios to forming ΔW* densely in
   the same run; ``svd``/``flexlora``/``florana`` as ``aggregate`` runs them (``solver="auto"``: exact up to 256
   stacked columns, randomized/iterative above), and the exact solvers beside them where they fit (U ≤ 100).
   Accuracy on the first ``--div-modules`` matrices (the first one only above U = 100): ρ/ρ_min − 1 for svd and
   flexlora against the exact Eckart–Young bound (QR for U ≤ 100, a dense float64 SVD of ΔW* above), FLoRA-NA's
   objective ‖ΔW* − B̂Â‖² against the exact solver's (U ≤ 100) and FedIT's. Peak extra memory as in table 1 (on
   CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before).

4. ``--batched`` (instead of 1-3, issue 30): per matrix, each rule as today's per-client code (``batch_mode("off")``),
   batched over the clients (``batch_mode("on")``: what an accelerator runs, on any device) and as ``aggregate``
   runs it by default (``"auto"``: batched on accelerators, the in-place per-client sums and per-iteration
   convergence reads on the CPU), against forming ``ΔW* = Σ w_u B_u A_u`` densely (one (d×Ur)·(Ur×k) GEMM), all
   in the same run, interleaved in a rotating order, the best of ``--repeats`` (CPU seconds on the CPU, wall seconds on CUDA);
   ``--device auto`` takes CUDA when present. The last
   column is the largest difference between the batched and per-client results, relative to the result's size.
   "X mixed": the same uploads cut to ranks r/2 and r alternately, with scales α/r_u (its dense column is the
   full-rank formation, an upper bound of the mixed one).

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


def make_uploads(names, U, eps, seed, *, round_one=False, device="cpu"):
    """Per-client dicts of factors drifting from a common start (no extra copies of the uploads)."""
    g = torch.Generator(device=device).manual_seed(seed)
    Bs = [{} for _ in range(U)]
    As = [{} for _ in range(U)]
    shared_A = {}
    for name in names:
        B0 = torch.zeros(D, RANK, device=device) if round_one else torch.randn(D, RANK, generator=g, device=device)
        A0 = torch.randn(RANK, K, generator=g, device=device)
        shared_A[name] = A0
        for u in range(U):
            Bs[u][name] = torch.randn(D, RANK, generator=g, device=device).mul_(eps).add_(B0)
            As[u][name] = torch.randn(RANK, K, generator=g, device=device).mul_(eps).add_(A0)
    n = torch.randint(50, 500, (U,), generator=torch.Generator().manual_seed(seed)).double()
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


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_on(device, fn):
    """(wall seconds, peak extra MiB) of ``fn()``: VmHWM on the CPU, the CUDA allocator's peak on a GPU."""
    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        res = fn()
        sync(device)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = vm_kib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        res = fn()
        seconds = time.perf_counter() - t0
        peak = max(vm_kib("VmHWM") - before, 0) / 1024
    del res
    return seconds, peak


SCALE_METHODS = [("dense ΔW*", None, {}), ("fedit", "fedit", {}), ("svd", "svd", {}), ("flexlora", "flexlora", {}),
                 ("florana", "florana", {}), ("svd (exact)", "svd", {"solver": "exact"}),
                 ("florana (exact)", "florana", {"solver": "exact"})]


def dense_ideal64(b, a, w):
    """ΔW* formed densely in float64 (for U where the QR-based metrics would cost more than the benchmark)."""
    return torch.cat([B.double() * float(c) for B, c in zip(b, w)], dim=1) @ torch.cat([A.double() for A in a], dim=0)


def scale_accuracy(names, Bs, As, w, U, device):
    """ρ/ρ_min − 1 for svd, FLoRA-NA's objective against the exact solver's and FedIT's, mean over ``names``."""
    out = {"svd": [], "flexlora": [], "florana/exact": [], "florana/fedit": [], "sweeps": [], "cg": []}
    for name in names:
        b, a = [B[name] for B in Bs], [A[name] for A in As]
        res = {m: aggregate(m, b, a, w) for m in ("svd", "flexlora", "florana", "fedit")}
        out["sweeps"].append(res["florana"].info["iterations"])
        out["cg"].append(res["florana"].info.get("cg_steps", 0))
        if U * RANK <= 1600:  # QR-based, exact in float64
            bound = eckart_young_bound(b, a, w)
            rho = {m: divergence(b, a, w, r) for m, r in res.items()}
            rho["exact"] = divergence(b, a, w, aggregate("florana", b, a, w, solver="exact"))
        else:  # a dense float64 ΔW*, its singular values, and each result's error against it
            X = dense_ideal64(b, a, w)
            norm = torch.linalg.matrix_norm(X)
            rho = {m: float(torch.linalg.matrix_norm(X - r.B.double() @ r.A.double()) / norm) for m, r in res.items()}
            s = torch.linalg.svdvals(X)
            bound = float(s[RANK:].norm() / s.norm())
            rho["exact"] = None
            del X
        out["svd"].append(rho["svd"] / bound - 1)
        out["flexlora"].append(rho["flexlora"] / bound - 1)
        if rho["exact"] is not None:
            out["florana/exact"].append(rho["florana"] ** 2 / rho["exact"] ** 2 - 1)
        out["florana/fedit"].append(rho["florana"] ** 2 / rho["fedit"] ** 2)
    return {k: (statistics.fmean(v) if v else None) for k, v in out.items()}


def scale_table(U_list, layers_for, repeats, seed, n_acc, device):
    rows = []
    for U in U_list:
        layers = layers_for(U)
        names = module_names(layers)
        Bs, As, _, w = make_uploads(names, U, eps=0.2, seed=seed, device=device)
        methods = [m for m in SCALE_METHODS if not (m[2].get("solver") == "exact" and U * RANK > 1600)]
        one = names[0]
        for _label, m, kw in methods:  # warm-up on one module
            if m:
                aggregate_model(m, [{one: B[one]} for B in Bs], [{one: A[one]} for A in As], w, **kw)
        times = {label: [] for label, _, _ in methods}
        peaks = {label: 0.0 for label, _, _ in methods}
        for _ in range(repeats):
            for label, m, kw in methods:
                fn = (lambda: dense_ideal(Bs, As, w, names)) if m is None else (lambda m=m, kw=kw: aggregate_model(m, Bs, As, w, **kw))
                t, mib = measure_on(device, fn)
                times[label].append(t)
                peaks[label] = max(peaks[label], mib)
                print(f"  U={U} {label}: {t:.3f}s, +{mib:.0f} MiB", file=sys.stderr, flush=True)
        acc = scale_accuracy(names[:n_acc if U * RANK <= 1600 else 1], Bs, As, w, U, device)
        print(f"  U={U} accuracy: {acc}", file=sys.stderr, flush=True)
        dense = statistics.median(times["dense ΔW*"])
        for label, _, _ in methods:
            t = statistics.median(times[label])
            rows.append((U, len(names), label, t / len(names), t / dense, peaks[label], acc))
        Bs = As = None  # free this U's uploads before the next
        gc.collect()
    print(f"\n### Scale: {D}×{K} matrices, r = {RANK}, float32 uploads drifting from a common start (ε = 0.2), on {device}\n")
    print("| U | matrices | method | s per matrix | × dense | peak extra MiB | accuracy (first matrices) |")
    print("|---:|---:|---|---:|---:|---:|---|")
    for U, n_mat, label, t, ratio, mib, acc in rows:
        note = ""
        if label == "svd":
            note = f"ρ/ρ_min − 1 = {acc['svd']:.1e}"
        elif label == "flexlora":
            note = f"ρ/ρ_min − 1 = {acc['flexlora']:.1e}"
        elif label == "florana":
            vs = f"objective/exact − 1 = {acc['florana/exact']:.1e}; " if acc["florana/exact"] is not None else ""
            note = f"{vs}objective/FedIT's = {acc['florana/fedit']:.4f}; {acc['sweeps']:.1f} sweeps, {acc['cg']:.0f} CG steps"
        print(f"| {U} | {n_mat} | {label} | {t:.4f} | {ratio:.3f} | {mib:.0f} | {note} |")


BATCHED_METHODS = ["fedit", "fedsa", "ffa", "fedex", "flora", "fedsb", "hetlora", "svd", "flexlora", "florana",
                   "fedit mixed", "flora mixed", "hetlora mixed", "flexlora mixed"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here; pass --device cpu or auto")
    return device


def batched_uploads(U, d, k, r, seed, device):
    """One matrix's uploads drifting from a common start (ε = 0.2), float32, and a shared A for the frozen-A rules."""
    g = torch.Generator(device=device).manual_seed(seed)
    B0, A0 = torch.randn(d, r, generator=g, device=device), torch.randn(r, k, generator=g, device=device)
    Bs = [torch.randn(d, r, generator=g, device=device).mul_(0.2).add_(B0) for _ in range(U)]
    As = [torch.randn(r, k, generator=g, device=device).mul_(0.2).add_(A0) for _ in range(U)]
    n = torch.randint(50, 500, (U,), generator=torch.Generator().manual_seed(seed)).double()
    return Bs, As, A0, n / n.sum()


def mixed_ranks(Bs, As, r):
    """The same uploads cut to ranks r/2, r, r/2, … with scales α/r_u (α = 2r): the mixed-rank, scaled case."""
    ranks = [r if u % 2 else max(1, r // 2) for u in range(len(Bs))]
    return [B[:, :q] for B, q in zip(Bs, ranks)], [A[:q] for A, q in zip(As, ranks)], [2.0 * r / q for q in ranks]


def batched_call(method, Bs, As, shared_A, w):
    if method.endswith(" mixed"):
        b, a, scales = mixed_ranks(Bs, As, Bs[0].shape[1])
        return aggregate(method.split()[0], b, a, w, scales=scales)
    if method == "dense ΔW*":
        wcol = w.to(Bs[0].device, Bs[0].dtype).repeat_interleave(Bs[0].shape[1])
        return (torch.cat(Bs, dim=1) * wcol) @ torch.cat(As, dim=0)
    if method in ("ffa", "fedsb"):
        As = [shared_A] * len(As)
    return aggregate(method, None if method == "fedsa" else Bs, As, w)


def batched_once(device, fn):
    """Seconds of ``fn()``: CPU seconds of this process on the CPU (``time.process_time``: on a machine shared with
    other jobs wall time includes waiting for a core), wall seconds with the device synchronised around it on CUDA."""
    sync(device)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def _rel_gap(a, b):
    xs = [(getattr(a, f), getattr(b, f)) for f in ("B", "A") if getattr(b, f) is not None]
    return max(float((x.double() - y.double()).abs().max()) / max(float(y.double().abs().max()), 1e-300) for x, y in xs)


def batched_table(U_list, d, r, repeats, seed, device, methods):
    from fedlora.aggregation._batch import batch_mode

    modes = ("off", "on", "auto")
    rows = []
    for U in U_list:
        Bs, As, shared_A, w = batched_uploads(U, d, d, r, seed, device)
        for m in methods:
            from_modes = {}
            for mode in modes:  # warm-up, and the results compared below
                with batch_mode(mode):
                    from_modes[mode] = batched_call(m, Bs, As, shared_A, w)
            times = {mode: [] for mode in ("dense", *modes)}
            order = ["dense", *modes]
            for i in range(repeats):  # interleaved, the order rotated: the first after another job runs cold
                for mode in order[i % 4:] + order[: i % 4]:
                    if mode == "dense":
                        times[mode].append(batched_once(device, lambda: batched_call("dense ΔW*", Bs, As, shared_A, w)))
                        continue
                    with batch_mode(mode):
                        times[mode].append(batched_once(device, lambda m=m: batched_call(m, Bs, As, shared_A, w)))
            times = {key: min(v) for key, v in times.items()}  # best of: the noise on a shared machine only adds
            t_dense, res = times["dense"], from_modes
            gap = _rel_gap(res["on"], res["off"])
            rows.append((U, m, t_dense, times["off"], times["on"], times["auto"], gap))
            print(f"  U={U} {m}: per-client {times['off'] * 1e3:.2f} ms, batched {times['on'] * 1e3:.2f} ms, "
                  f"auto {times['auto'] * 1e3:.2f} ms, dense {t_dense * 1e3:.2f} ms", file=sys.stderr, flush=True)
        Bs = As = None
        gc.collect()
    clock = "wall ms" if device.startswith("cuda") else "CPU ms"
    print(f"\n### Batched over clients: {d}×{d} matrix, r = {r}, float32 uploads drifting from a common start, on {device} "
          f"({clock}, best of {repeats})\n")
    print("| U | method | dense ΔW* ms | per-client ms | batched ms | auto ms | batched / per-client | auto / per-client "
          "| batched / dense | auto / dense | max rel. gap |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for U, m, td, t_off, t_on, t_auto, gap in rows:
        print(f"| {U} | {m} | {td * 1e3:.3f} | {t_off * 1e3:.3f} | {t_on * 1e3:.3f} | {t_auto * 1e3:.3f} | {t_on / t_off:.2f} "
              f"| {t_auto / t_off:.2f} | {t_on / td:.3f} | {t_auto / td:.3f} | {gap:.1e} |")


def sync_table(device, d=1024, r=8, U=100):
    """Host synchronisations per solve on CUDA (``torch.cuda.set_sync_debug_mode("warn")``, one warning each) for
    the randomized SVD and the Gram-free FLoRA-NA, batched and per-client, at two iteration counts (tol = 0: every
    iteration runs): the batched solvers' count should grow by about 1/CHECK_EVERY per iteration, plus the syncs
    inside ``torch.linalg`` (eigh, svdvals, qr check their status on the host)."""
    import warnings

    from fedlora.aggregation import florana, sketch
    from fedlora.aggregation._batch import batch_mode

    if not device.startswith("cuda"):
        print("\n(--syncs needs a CUDA device; skipped)")
        return
    g = torch.Generator(device=device).manual_seed(0)
    Bs = [torch.randn(d, r, generator=g, device=device) for _ in range(U)]
    As = [torch.randn(r, d, generator=g, device=device) for _ in range(U)]
    w = torch.full((U,), 1.0 / U, dtype=torch.float64)
    op = sketch.Ideal.stack(Bs, As, w)
    runs = {"randomized svd": lambda n: sketch.randomized_svd(op, r, tol=0.0, max_power=n).power_iterations,
            "florana iterative": lambda n: florana._iterative(Bs, As, w, tol=0.0, max_iter=n, seed=0).info["iterations"]}
    rows = []
    for name, fn in runs.items():
        for mode in ("off", "on"):
            for n in (2, 8):
                with batch_mode(mode):
                    fn(n)  # warm-up
                    torch.cuda.synchronize()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                        try:
                            iters = fn(n)
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                rows.append((name, "per-client" if mode == "off" else "batched", n, iters, len(caught)))
    print(f"\n### Host synchronisations per solve on {device} (U = {U}, {d}×{d}, r = {r}, tol = 0)\n")
    print("| solver | code | iteration cap | iterations run | synchronisations |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print("| {} | {} | {} | {} | {} |".format(*row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, U ∈ {4, 10}, one repeat")
    ap.add_argument("--clients", type=int, nargs="+", help="U values (default 10 50)")
    ap.add_argument("--layers", type=int, help="transformer layers (default 32)")
    ap.add_argument("--repeats", type=int, help="interleaved timing repeats (default 3)")
    ap.add_argument("--div-modules", type=int, help="modules in the divergence table (default 4)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", action="store_true", help="the cross-device scale table instead (U ∈ {10, 100, 1000})")
    ap.add_argument("--scale-clients", type=int, nargs="+", default=[10, 100, 1000], help="U values of --scale")
    ap.add_argument("--scale-layers-1000", type=int, default=4, help="layers at U ≥ 1000 under --scale (default 4)")
    ap.add_argument("--device", default="auto", help="where the uploads live: auto (CUDA when present), cpu, cuda")
    ap.add_argument("--batched", action="store_true", help="batched vs per-client vs dense ΔW* (issue 30) instead")
    ap.add_argument("--batched-clients", type=int, nargs="+", default=[10, 100, 1000], help="U values of --batched")
    ap.add_argument("--shape", type=int, default=4096, help="d = k of --batched (default 4096: LLaMA-7B)")
    ap.add_argument("--rank", type=int, default=8, help="r of --batched (default 8)")
    ap.add_argument("--methods", nargs="+", default=BATCHED_METHODS, help="rules of --batched")
    ap.add_argument("--syncs", action="store_true", help="with --batched on CUDA: count the solvers' host synchronisations")
    args = ap.parse_args()
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    U_list = args.clients or ([4, 10] if args.quick else [10, 50])
    layers = args.layers or (2 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    n_div = args.div_modules or (2 if args.quick else 4)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average before start {os.getloadavg()[0]:.2f}")
    print(f"command: python benchmarks/bench_aggregation.py {' '.join(sys.argv[1:])}".rstrip())
    if args.batched:
        batched_table(args.batched_clients, args.shape, args.rank, args.repeats or 3, args.seed, args.device, args.methods)
        if args.syncs:
            sync_table(args.device)
        return
    if args.scale:
        big = args.scale_layers_1000
        scale_table(args.scale_clients, lambda U: big if U >= 1000 else (args.layers or (2 if args.quick else 32)),
                    args.repeats or (1 if args.quick else 2), args.seed, n_div, args.device)
        return
    cost_table(U_list, layers, repeats, args.seed)
    factorisation_table(U_list, repeats, args.seed)
    divergence_table(U_list, n_div, args.seed)


if __name__ == "__main__":
    main()
