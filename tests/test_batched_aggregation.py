"""Server aggregation batched over clients (issue 30): the batched code (``batch_mode("on")``, what an accelerator
runs) against today's per-client code (``batch_mode("off")``, kept as the reference) on random float64 cases,
mixed ranks and client scales included, to 1e-10; and no host reads inside the solvers' iterations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.aggregation import METHODS, _batch, aggregate, florana, mixed_rank_rules, sketch
from fedlora.aggregation._batch import batch_mode, stack_padded
from test_aggregation import SHARED_A

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-10
# The mixed-rank rules that need nothing beyond the uploads (fslora's sketches need the global start).
MIXED = tuple(m for m in mixed_rank_rules() if m != "fslora")

pytestmark = pytest.mark.usefixtures("one_thread")


def _fields(res):
    out = {"B": res.B, "A": res.A, "p": res.p, "q": res.q, "eval_B": res.eval_B, "core": res.core}
    if res.base_delta_factors is not None:
        out["L"], out["R"] = res.base_delta_factors
    for u, (b, a) in enumerate(res.clients or []):
        out[f"client {u} B"], out[f"client {u} A"] = b, a
    return out


def assert_same(on, off, what):
    """Every tensor the two results carry agrees to 1e-10 (relative to its size), the solvers' counts exactly."""
    fa, fb = _fields(on), _fields(off)
    for key, x in fb.items():
        y = fa[key]
        assert (x is None) == (y is None), (what, key)
        if x is None:
            continue
        assert x.shape == y.shape, (what, key)
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        assert float((x.to(F64) - y.to(F64)).abs().max(), ) <= TOL * scale if x.numel() else True, (what, key)
    for key in ("iterations", "cg_steps", "power_iterations", "converged", "solver", "fell_back_to_fedit", "rank"):
        assert on.info.get(key) == off.info.get(key), (what, key)
    if "objective" in off.info:
        assert on.info["objective"] == pytest.approx(off.info["objective"], rel=TOL, abs=TOL)


def both(method, Bs, As, w, **kw):
    with batch_mode("on"):
        on = aggregate(method, Bs, As, w, **kw)
    with batch_mode("off"):
        off = aggregate(method, Bs, As, w, **kw)
    assert_same(on, off, method)
    return on


@st.composite
def uploads(draw, mixed: bool = False):
    U = draw(st.integers(1, 8))
    ranks = [draw(st.integers(1, 6)) for _ in range(U)] if mixed else [draw(st.integers(1, 6))] * U
    R = max(ranks)
    d, k = draw(st.integers(R, 24)), draw(st.integers(R, 24))
    regime = draw(st.sampled_from(["independent", "drift", "B zero"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    B0, A0 = rnd(d, R), rnd(R, k)
    if regime == "drift":
        Bs = [B0[:, :r] + 0.3 * rnd(d, r) for r in ranks]
        As = [A0[:r] + 0.3 * rnd(r, k) for r in ranks]
    else:
        Bs = [rnd(d, r) * (0.0 if regime == "B zero" else 1.0) for r in ranks]
        As = [rnd(r, k) for r in ranks]
    w = torch.rand(U, generator=g, dtype=F64) + 0.05
    scales = (torch.rand(U, generator=g, dtype=F64) + 0.5).tolist() if mixed and draw(st.booleans()) else None
    return Bs, As, w / w.sum(), scales


@SETTINGS
@given(uploads())
def test_every_rule_batched_equals_per_client(case):
    Bs, As, w, _ = case
    for method in METHODS:
        shared = [As[0]] * len(As) if method in SHARED_A else As
        both(method, None if method == "fedsa" else Bs, shared, w)


@SETTINGS
@given(uploads(mixed=True))
def test_mixed_rank_rules_batched_equal_per_client(case):
    Bs, As, w, scales = case
    for method in MIXED:
        both(method, None if method == "fedsa" else Bs, As, w, scales=scales)
    both("hetlora", Bs, As, w, scales=scales, weighting="data")


@SETTINGS
@given(uploads(), st.sampled_from([0.0, 1e-3, 0.01]))
def test_solvers_batched_equal_per_client(case, tol):
    """The randomized SVD and the Gram-free FLoRA-NA, forced, with tolerances that take several iterations."""
    Bs, As, w, _ = case
    both("svd", Bs, As, w, solver="randomized", tol=tol)
    both("flexlora", Bs, As, w, solver="randomized", tol=tol)
    both("florana", Bs, As, w, solver="iterative", tol=tol * 1e-3)
    both("florana", Bs, As, w, solver="exact")


def test_fedsb_cores_batched_equal_per_client():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(12, 4, generator=g, dtype=F64), torch.randn(4, 10, generator=g, dtype=F64)
    cores = [torch.randn(4, 4, generator=g, dtype=F64) for _ in range(5)]
    w = torch.full((5,), 0.2, dtype=F64)
    both("fedsb", [B] * 5, [A] * 5, w, cores=cores)


def _rsvd(op, mode, **kw):
    with batch_mode(mode):
        return sketch.randomized_svd(op, 2, oversample=2, **kw)


@pytest.mark.parametrize("every", [1, 2, 3, 50])
def test_solver_results_do_not_depend_on_the_check_interval(monkeypatch, every):
    """The frozen state after the stop: the result is the per-iteration loop's whatever the interval, with the
    iteration cap reached (tol = 0) and with an early stop."""
    Bs, As, w = _clients(7, U=12)
    op = sketch.Ideal.stack(Bs, As, w)
    monkeypatch.setattr(_batch, "CHECK_EVERY", every)
    iters = set()
    for tol, max_power in ((0.0, 9), (0.01, 12)):
        on, off = _rsvd(op, "on", tol=tol, max_power=max_power), _rsvd(op, "off", tol=tol, max_power=max_power)
        assert (on.power_iterations, on.converged, on.residual_sq) == (off.power_iterations, off.converged, off.residual_sq)
        for a, b in ((on.U, off.U), (on.S, off.S), (on.Vh, off.Vh)):
            assert torch.equal(a, b)
        iters.add(on.power_iterations)
        both("florana", Bs, As, w, solver="iterative", tol=tol, max_iter=7)
    assert 9 in iters and len(iters) == 2  # the cap and an early stop


class HostReads:
    """Counts Python-level host reads of tensors: ``item``, ``tolist``, ``float``/``int``/``bool`` of a tensor."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **kw):
                self.count += 1
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def during(self, fn):
        before = self.count
        out = fn()
        return out, self.count - before


def _clients(seed, U=10, d=40, k=30, r=3):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
    As = [torch.randn(r, k, generator=g, dtype=F64) for _ in range(U)]
    return Bs, As, torch.full((U,), 1 / U, dtype=F64)


def test_randomized_svd_reads_the_host_a_fixed_number_of_times(monkeypatch):
    """With the check interval above the iteration count the reads do not grow with the iterations; at the
    accelerators' interval they grow as iterations / CHECK_EVERY; today's loop reads several per iteration."""
    Bs, As, w = _clients(0)
    op = sketch.Ideal.stack(Bs, As, w)
    reads = HostReads(monkeypatch)

    def run(max_power, mode="on"):
        with batch_mode(mode):
            res, n = reads.during(lambda: sketch.randomized_svd(op, 2, tol=0.0, max_power=max_power, oversample=2))
        assert res.power_iterations == max_power  # tol = 0 on independent clients: the cap is reached
        return n

    monkeypatch.setattr(_batch, "CHECK_EVERY", 1000)
    assert run(2) == run(10)
    monkeypatch.setattr(_batch, "CHECK_EVERY", 4)
    assert run(10) - run(2) <= math.ceil(8 / 4) + 1
    assert run(10, "off") - run(2, "off") >= 8 * 3  # the per-iteration loop reads each scalar back


def test_florana_iterative_reads_the_host_a_fixed_number_of_times(monkeypatch):
    """The sweeps and the CG steps: the reads do not grow with the sweeps when the interval exceeds them."""
    Bs, As, w = _clients(1, U=12)
    reads = HostReads(monkeypatch)
    monkeypatch.setattr(_batch, "CHECK_EVERY", 10**6)

    def run(max_iter, cg_steps):
        with batch_mode("on"):
            res, n = reads.during(lambda: florana._iterative(Bs, As, w, tol=0.0, max_iter=max_iter, seed=0,
                                                              cg_steps=cg_steps))
        return res, n

    short, n_short = run(2, 3)
    long, n_long = run(8, 20)
    assert long.info["iterations"] > short.info["iterations"] and long.info["cg_steps"] > short.info["cg_steps"]
    # One read per CG solve (its first check; 2 solves per sweep, the masked sweeps after a stop included) and the
    # fixed reads of the result.
    assert n_long - n_short <= 2 * (8 - 2)
    assert n_long - n_short < long.info["cg_steps"] - short.info["cg_steps"]


def test_hetlora_norms_read_the_host_once(monkeypatch):
    Bs, As, w = _clients(2, U=20)
    reads = HostReads(monkeypatch)
    from fedlora.aggregation.hetlora import sparsity_weights

    with batch_mode("on"):
        omega, n = reads.during(lambda: sparsity_weights(Bs, As, w))
    with batch_mode("off"):
        ref, n_ref = reads.during(lambda: sparsity_weights(Bs, As, w))
    assert n <= 2 < len(Bs) <= n_ref
    torch.testing.assert_close(omega, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dim", [0, 1])
def test_padding_to_the_largest_rank_is_exact(dim):
    g = torch.Generator().manual_seed(4)
    ranks = [2, 5, 2, 3]
    ts = [torch.randn(*((r, 7) if dim == 0 else (7, r)), generator=g, dtype=F64) for r in ranks]
    st_ = stack_padded(ts, dim)
    assert st_.shape == ((4, 5, 7) if dim == 0 else (4, 7, 5))
    for u, (t, r) in enumerate(zip(ts, ranks)):
        assert torch.equal(st_[u].narrow(dim, 0, r), t)
        assert not st_[u].narrow(dim, r, 5 - r).any()  # zeros: they change no product


def test_batch_mode_names_its_choices():
    with pytest.raises(ValueError, match="batch mode is 'fast'"):
        with batch_mode("fast"):
            pass


def test_auto_is_per_client_on_cpu_and_batched_elsewhere():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert not _batch.batched(cpu) and _batch.batched(meta)
    with batch_mode("on"):
        assert _batch.batched(cpu)
    with batch_mode("off"):
        assert not _batch.batched(meta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs a CUDA device")
def test_florana_iterative_does_not_synchronise_per_sweep_on_cuda(monkeypatch):
    """On CUDA every synchronisation is counted (``set_sync_debug_mode("warn")``, one warning each): with the check
    interval above the sweep count, 8 sweeps synchronise as often as 2 (only the fixed reads: the CG solves' first
    checks and the result). The randomized SVD is left out: ``torch.linalg.eigh``/``svdvals`` check their status on
    the host each iteration."""
    import warnings

    Bs, As, w = _clients(1, U=12)
    Bs, As = [B.cuda() for B in Bs], [A.cuda() for A in As]
    monkeypatch.setattr(_batch, "CHECK_EVERY", 10**6)

    def syncs(max_iter):
        florana._iterative(Bs, As, w, tol=0.0, max_iter=max_iter, seed=0)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = florana._iterative(Bs, As, w, tol=0.0, max_iter=max_iter, seed=0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return res.info["iterations"], len(caught)

    (short, n_short), (long, n_long) = syncs(2), syncs(8)
    assert long > short
    assert n_long - n_short <= 2 * (8 - 2)  # at most the CG solves' first checks, never one per CG step


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_rule_options_batched_equal_per_client(U, r, seed):
    """The options that feed a rule's own per-client loop: LoRA-A²'s masks (both averages, both factors), FSLoRA's
    index sets with the start, ILoRA's current content and starts, at mixed ranks."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    d, k = r + 5, r + 4
    w = torch.rand(U, generator=g, dtype=F64) + 0.05
    w = w / w.sum()
    Bs, As, A0, B0 = [rnd(d, r) for _ in range(U)], [rnd(r, k) for _ in range(U)], rnd(r, k), rnd(d, r)
    masks = [torch.rand(r, generator=g) < 0.6 for _ in range(U)]
    for average in ("all", "selected"):
        both("loraa2", Bs, [A0] * U, w, masks=masks, start=B0, average=average)
        both("loraa2", [B0] * U, As, w, trained="A", masks=masks, start=A0, average=average)
    ks = [int(torch.randint(1, r + 1, (1,), generator=g)) for _ in range(U)]
    sets = [torch.randperm(r, generator=g)[:q].sort().values for q in ks]
    both("fslora", [rnd(d, q) for q in ks], [rnd(q, k) for q in ks], w, index_sets=sets, start=(B0, A0))
    current = (rnd(d, r), rnd(r, k))
    starts = [(rnd(d, q), rnd(q, k)) for q in ks]
    both("ilora", [rnd(d, q) for q in ks], [rnd(q, k) for q in ks], w, current=current, starts=starts, rank=r)
