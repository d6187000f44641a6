"""Numbers the aggregation layer must get right: exactness, optimality against brute force, bytes against a
hand count, the Eckart–Young bound against a dense SVD, and the one-sentence errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fedlora.aggregation import (
    METHODS,
    Aggregate,
    CommBytes,
    aggregate,
    aggregate_model,
    comm_bytes,
    comm_elements,
    divergence,
    eckart_young_bound,
    method_options,
    model_comm_bytes,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread: these matrices are tiny


@pytest.fixture(autouse=True, scope="module")
def numpy_one_thread():
    """The same for numpy's BLAS in the brute-force reference, when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield


def clients(U, r, d, k, seed, *, drift=None, dtype=F64, shared_A=False, zero_B=False):
    """Random uploads. ``drift=None``: independent clients; else ``B_u = B0 + drift·noise`` (and A likewise),
    the regime of real training where clients move away from a common broadcast."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    if drift is None:
        Bs = [rnd(d, r) for _ in range(U)]
        As = [rnd(r, k) for _ in range(U)]
    else:
        B0, A0 = rnd(d, r), rnd(r, k)
        Bs = [B0 + drift * rnd(d, r) for _ in range(U)]
        As = [A0 + drift * rnd(r, k) for _ in range(U)]
    if shared_A:
        As = [As[0].clone() for _ in range(U)]
    if zero_B:
        Bs = [torch.zeros(d, r, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.2
    w = w / w.sum()
    return [B.to(dtype) for B in Bs], [A.to(dtype) for A in As], w


def ideal(Bs, As, w):
    return sum(float(c) * B.to(F64) @ A.to(F64) for c, B, A in zip(w, Bs, As))


def dense_rho(Bs, As, w, res):
    target = ideal(Bs, As, w)
    return float(torch.linalg.matrix_norm(target - res.delta().to(F64)) / torch.linalg.matrix_norm(target))


def dense_bound(Bs, As, w, rank):
    s = torch.linalg.svdvals(ideal(Bs, As, w))
    return float(torch.linalg.vector_norm(s[rank:]) / torch.linalg.vector_norm(s))


# ---------------------------------------------------------------------------------------------------------
# Exact methods


@pytest.mark.parametrize("shape", [(5, 4, 37, 23), (3, 8, 16, 64), (8, 2, 64, 9), (6, 5, 12, 12)])
@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_exact_methods_reproduce_the_ideal_update(method, shape):
    Bs, As, w = clients(*shape, seed=sum(shape))
    res = aggregate(method, Bs, As, w)
    assert dense_rho(Bs, As, w, res) < 1e-10
    assert divergence(Bs, As, w, res) < 1e-10


def test_ffa_is_exact_with_a_shared_A_and_refuses_different_As():
    Bs, As, w = clients(6, 4, 40, 30, seed=1, shared_A=True)
    res = aggregate("ffa", Bs, As, w)
    assert torch.equal(res.A, As[0])
    assert dense_rho(Bs, As, w, res) < 1e-12
    assert divergence(Bs, As, w, res) < 1e-12
    As[3] = As[3] + 1e-3
    with pytest.raises(ValueError, match=r"client 3's A differs from client 0's .*FFA-LoRA needs the frozen shared A0"):
        aggregate("ffa", Bs, As, w)


def test_fedit_and_fedsa_follow_their_rules():
    Bs, As, w = clients(4, 3, 20, 10, seed=2)
    fit = aggregate("fedit", Bs, As, w)
    torch.testing.assert_close(fit.B, sum(c * B for c, B in zip(w, Bs)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fit.A, sum(c * A for c, A in zip(w, As)), rtol=1e-14, atol=1e-14)
    sa = aggregate("fedsa", Bs, As, w)
    assert sa.B is None and sa.personalised and sa.p is None
    torch.testing.assert_close(sa.A, fit.A, rtol=0, atol=0)
    torch.testing.assert_close(sa.eval_B, fit.B, rtol=0, atol=0)
    # FedIT's error is the weighted covariance of the factors: ΔW* − B̂Â = Σ w_u (B_u − B̂)(A_u − Â).
    cov = sum(c * (B - fit.B) @ (A - fit.A) for c, B, A in zip(w, Bs, As))
    torch.testing.assert_close(ideal(Bs, As, w) - fit.delta(), cov, rtol=1e-10, atol=1e-12)
    only_A = aggregate("fedsa", None, As, w)
    assert only_A.eval_B is None
    with pytest.raises(ValueError, match="has no B to form"):
        only_A.delta()
    assert divergence(Bs, As, w, only_A) == pytest.approx(divergence(Bs, As, w, sa), rel=1e-12)


def test_coefficients_describe_the_broadcast():
    Bs, As, w = clients(5, 3, 24, 18, seed=3)
    for method in ("fedit", "fedex", "florana"):
        res = aggregate(method, Bs, As, w)
        torch.testing.assert_close(res.B, sum(c * B for c, B in zip(res.p, Bs)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.A, sum(c * A for c, A in zip(res.q, As)), rtol=1e-12, atol=1e-12)
    assert aggregate("svd", Bs, As, w).p is None and aggregate("flora", Bs, As, w).q is None


def test_fedex_residual_factors_and_dense_form():
    Bs, As, w = clients(3, 2, 10, 7, seed=4)
    res = aggregate("fedex", Bs, As, w)
    L, R = res.base_delta_factors
    assert L.shape == (10, 4 * 2) and R.shape == (4 * 2, 7)
    torch.testing.assert_close(res.base_delta, ideal(Bs, As, w) - res.B @ res.A, rtol=1e-10, atol=1e-12)
    assert res.residual_is_dense  # 10·7 = 70 < 8·17 = 136
    assert res.residual_elements() == 70


# ---------------------------------------------------------------------------------------------------------
# FLoRA-NA against FedIT, the bound and a brute-force optimum


def florana_objective(Bs, As, w, p, q):
    B = sum(float(c) * B for c, B in zip(p, Bs))
    A = sum(float(c) * A for c, A in zip(q, As))
    return float(torch.linalg.matrix_norm(ideal(Bs, As, w) - B @ A) ** 2)


def brute_force_optimum(Bs, As, w, starts=40, seed=0):
    """min over (p, q) of ‖ΔW* − (Σ p_u B_u)(Σ q_u A_u)‖² by L-BFGS from many random starts (dense, numpy).

    The term ‖ΔW*‖²·(‖p‖² − ‖q‖²)² removes the flat direction (c·p, q/c) without changing the minimum
    (every scale orbit has a balanced point), which makes L-BFGS converge several times faster."""
    U = len(Bs)
    D = ideal(Bs, As, w).numpy()
    Bn, An = torch.stack(Bs).numpy(), torch.stack(As).numpy()
    scale = float((D**2).sum())

    def f_and_grad(x):
        p, q = x[:U], x[U:]
        Bh, Ah = np.tensordot(p, Bn, 1), np.tensordot(q, An, 1)
        E = D - Bh @ Ah
        gB, gA = -2 * E @ Ah.T, -2 * Bh.T @ E
        t = p @ p - q @ q
        grad = np.concatenate([np.einsum("dr,udr->u", gB, Bn) + 4 * scale * t * p,
                               np.einsum("rk,urk->u", gA, An) - 4 * scale * t * q])
        return (E**2).sum() + scale * t * t, grad

    rng = np.random.default_rng(seed)
    best = math.inf
    for _ in range(starts):
        x = scipy.optimize.minimize(
            f_and_grad, rng.normal(size=2 * U), jac=True, method="L-BFGS-B",
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12},
        ).x
        E = D - np.tensordot(x[:U], Bn, 1) @ np.tensordot(x[U:], An, 1)
        best = min(best, float((E**2).sum()))
    return best


CASES = [  # (U, r, d, k, seed, drift)
    (2, 2, 9, 6, 0, None), (3, 1, 12, 5, 1, None), (4, 3, 10, 14, 2, None), (5, 2, 8, 8, 3, None),
    (6, 1, 16, 11, 4, None), (3, 4, 7, 13, 5, None), (4, 2, 15, 15, 6, 1.0), (5, 3, 12, 9, 7, 1.0),
    (6, 2, 9, 16, 8, 0.3), (3, 3, 14, 10, 9, 0.3), (8, 2, 12, 12, 10, 0.1), (7, 4, 16, 13, 11, 0.1),
]


@pytest.mark.parametrize("U,r,d,k,seed,drift", CASES)
def test_florana_is_between_the_bound_and_fedit_and_matches_brute_force(U, r, d, k, seed, drift):
    Bs, As, w = clients(U, r, d, k, seed, drift=drift)
    res = aggregate("florana", Bs, As, w)
    rho_fl = divergence(Bs, As, w, res)
    rho_fit = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    bound = eckart_young_bound(Bs, As, w)
    assert bound - 1e-12 <= rho_fl <= rho_fit + 1e-12
    f = florana_objective(Bs, As, w, res.p, res.q)
    best = brute_force_optimum(Bs, As, w)
    scale = float(torch.linalg.matrix_norm(ideal(Bs, As, w)) ** 2)
    # Equal both ways: florana is no worse than the optimum, and the reference really found the optimum.
    assert abs(f - best) <= 1e-3 * best + 1e-12 * scale, (f, best)
    # ρ² of the result is the solver's own objective, evaluated densely here.
    assert rho_fl**2 * scale == pytest.approx(f, rel=1e-6, abs=1e-12 * scale)


def test_florana_objective_never_increases_and_stops_on_tolerance():
    Bs, As, w = clients(6, 3, 30, 20, seed=12, drift=0.5)
    res = aggregate("florana", Bs, As, w, restarts=0, tol=1e-12, max_iter=500)
    hist = res.info["objective"]
    assert res.info["converged"] and res.info["start"] == 0
    assert all(b <= a for a, b in zip(hist, hist[1:]))
    assert hist[-1] < 0.99 * hist[0]  # it improved on the FedIT point
    assert hist[-2] - hist[-1] <= 1e-12 * hist[-2]
    # The reported optimum is the objective at the returned (p, q).
    assert florana_objective(Bs, As, w, res.p, res.q) == pytest.approx(hist[-1], rel=1e-8)
    short = aggregate("florana", Bs, As, w, restarts=0, max_iter=2)
    assert short.info["iterations"] == 2 and not short.info["converged"]
    assert short.info["objective"][-1] >= hist[-1]


def test_florana_scale_convention_and_shared_A():
    Bs, As, w = clients(4, 3, 20, 15, seed=13)
    res = aggregate("florana", Bs, As, w)
    assert res.info["scale"] == "sum(q)=1" and float(res.q.sum()) == pytest.approx(1.0, abs=1e-12)
    # With a shared A the optimum is exact (B̂ = Σ w B, Â = A0) and Σq = 1 returns A0 itself.
    Bs, As, w = clients(4, 3, 20, 15, seed=14, shared_A=True)
    res = aggregate("florana", Bs, As, w)
    assert divergence(Bs, As, w, res) < 1e-7
    torch.testing.assert_close(res.A, As[0], rtol=1e-7, atol=1e-7)


def test_florana_max_iter_zero_is_fedit_and_duplicates_are_fine():
    Bs, As, w = clients(3, 2, 12, 9, seed=15)
    res = aggregate("florana", Bs, As, w, max_iter=0)
    fit = aggregate("fedit", Bs, As, w)
    assert res.info["fell_back_to_fedit"]
    torch.testing.assert_close(res.delta(), fit.delta(), rtol=0, atol=0)
    dup = aggregate("florana", Bs + Bs, As + As, torch.cat([w, w]) / 2)  # singular normal equations
    assert torch.isfinite(dup.p).all() and torch.isfinite(dup.q).all()
    assert divergence(Bs + Bs, As + As, torch.cat([w, w]) / 2, dup) <= divergence(Bs, As, w, fit) + 1e-12


# ---------------------------------------------------------------------------------------------------------
# The rank-r optimum and the bound


@pytest.mark.parametrize("shape", [(5, 4, 37, 23), (3, 8, 16, 64), (8, 2, 64, 9), (2, 1, 6, 6)])
def test_svd_reaches_the_eckart_young_bound_of_a_dense_svd(shape):
    Bs, As, w = clients(*shape, seed=100 + sum(shape))
    r = shape[1]
    res = aggregate("svd", Bs, As, w)
    assert res.B.shape == (shape[2], r) and res.A.shape == (r, shape[3])
    expected = dense_bound(Bs, As, w, r)
    assert expected > 0.05  # a case where rank r really loses something
    assert divergence(Bs, As, w, res) == pytest.approx(expected, rel=1e-9)
    assert dense_rho(Bs, As, w, res) == pytest.approx(expected, rel=1e-9)
    assert eckart_young_bound(Bs, As, w) == pytest.approx(expected, rel=1e-10)
    # The split is balanced: B̂ᵀB̂ = ÂÂᵀ = Σ_r.
    torch.testing.assert_close(res.B.T @ res.B, res.A @ res.A.T, rtol=1e-8, atol=1e-10)


def test_svd_rank_option_and_zero_padding():
    Bs, As, w = clients(4, 3, 30, 20, seed=16)
    res = aggregate("svd", Bs, As, w, rank=5)
    assert res.B.shape == (30, 5) and res.info["rank"] == 5
    assert divergence(Bs, As, w, res) == pytest.approx(dense_bound(Bs, As, w, 5), rel=1e-9)
    # ΔW* of rank 2 < r = 3: the extra column and row are zero and the result is exact.
    Bs = [torch.zeros(30, 3, dtype=F64) for _ in range(4)]
    Bs[1][:, 0] = torch.arange(30, dtype=F64)
    Bs[2][:, 1] = torch.ones(30, dtype=F64)
    res = aggregate("svd", Bs, As, w)
    assert res.info["rank"] == 2 and res.B.shape == (30, 3)
    assert torch.count_nonzero(res.B[:, 2]) == 0 and torch.count_nonzero(res.A[2]) == 0
    assert divergence(Bs, As, w, res) < 1e-9


def test_bound_rank_defaults_to_client_rank():
    Bs, As, w = clients(3, 2, 20, 20, seed=17)
    assert eckart_young_bound(Bs, As, w) == pytest.approx(dense_bound(Bs, As, w, 2), rel=1e-10)
    assert eckart_young_bound(Bs, As, w, rank=4) == pytest.approx(dense_bound(Bs, As, w, 4), rel=1e-10)
    assert eckart_young_bound(Bs, As, w, rank=6) < 1e-12  # ΔW* has rank ≤ Ur = 6


# ---------------------------------------------------------------------------------------------------------
# Degenerate rounds


# rules that need the frozen A every client shares (rolora: its B-round default; fedsb and ravan without cores=: the
# clients' factors B·C_u over the shared bases)
SHARED_A = ("ffa", "rolora", "fedsvd", "fedsb", "ravan", "loraa2")


def energy_threshold_one(method):
    """``tau=1`` for a rule exact only up to an energy threshold τ (florist, fedmomentum): every component kept, so
    the rule is exact and its data-dependent download reaches the declared bound on full-rank data."""
    return {"tau": 1.0} if "tau" in method_options(method) else {}


def _inputs_for(method, Bs, As):
    return (Bs, [As[0].clone() for _ in As]) if method in SHARED_A else (Bs, As)


@pytest.mark.parametrize("method", METHODS)
def test_one_client_is_exact_for_every_method(method):
    Bs, As, w = clients(1, 4, 33, 21, seed=18)
    res = aggregate(method, Bs, As, w, **energy_threshold_one(method))
    assert dense_rho(Bs, As, w, res) < 1e-10
    assert divergence(Bs, As, w, res) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_round_one_all_B_zero_gives_a_finite_zero_update(method):
    Bs, As, w = clients(5, 4, 30, 20, seed=19, zero_B=True)
    Bs, As = _inputs_for(method, Bs, As)
    res = aggregate(method, Bs, As, w)
    for t in (res.B, res.A, res.eval_B, res.p, res.q):
        assert t is None or torch.isfinite(t).all()
    assert torch.count_nonzero(res.delta()) == 0
    assert divergence(Bs, As, w, res) == 0.0
    assert eckart_young_bound(Bs, As, w) == 0.0


def test_divergence_is_zero_or_inf_when_the_ideal_update_is_zero():
    Bs, As, w = clients(2, 2, 8, 6, seed=20, zero_B=True)
    assert divergence(Bs, As, w, aggregate("fedit", Bs, As, w)) == 0.0
    stray = Aggregate(method="fedit", B=torch.ones(8, 2, dtype=F64), A=torch.ones(2, 6, dtype=F64))
    assert divergence(Bs, As, w, stray) == math.inf


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_keep_the_upload_dtype(method, dtype):
    Bs, As, w = clients(4, 3, 24, 16, seed=21, dtype=dtype, drift=0.2)
    Bs, As = _inputs_for(method, Bs, As)
    res = aggregate(method, Bs, As, w)
    assert res.A.dtype == dtype and (res.B is None or res.B.dtype == dtype)
    # float32 uploads are aggregated to float32 accuracy, not worse.
    if dtype == torch.float32 and method in ("fedex", "flora", *SHARED_A):
        assert divergence(Bs, As, w, res) < 1e-6
    if dtype == torch.float32 and method == "svd":
        assert divergence(Bs, As, w, res) == pytest.approx(eckart_young_bound(Bs, As, w), rel=1e-4)


@pytest.mark.parametrize("eps", [0.3, 1e-3, 1e-5])
def test_float32_uploads_drifting_slightly_keep_florana_and_svd_accurate(eps):
    # Small drifts put the information in small singular directions of the stacked factors: a float32 Gram
    # loses them (SVD then reached ρ = 2.3e-5 against a bound of 3.6e-7 at eps = 1e-3), a float64 one keeps
    # them down to the float32 rounding floor of B̂Â (~1e-7 here).
    Bs, As, w = clients(6, 8, 256, 192, seed=31, drift=eps, dtype=torch.float32)
    fedit_rho = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    bound = eckart_young_bound(Bs, As, w)
    assert divergence(Bs, As, w, aggregate("florana", Bs, As, w)) <= fedit_rho * (1 + 1e-3) + 1e-8
    assert divergence(Bs, As, w, aggregate("svd", Bs, As, w)) <= min(bound * (1 + 1e-3) + 5e-8, fedit_rho)


def test_divergence_matches_dense_computation_for_every_method():
    Bs, As, w = clients(4, 3, 25, 17, seed=22, drift=0.4)
    for method in METHODS:
        B_in, A_in = _inputs_for(method, Bs, As)
        res = aggregate(method, B_in, A_in, w)
        assert divergence(B_in, A_in, w, res) == pytest.approx(dense_rho(B_in, A_in, w, res), rel=1e-9, abs=1e-13)


# ---------------------------------------------------------------------------------------------------------
# Bytes


def test_comm_bytes_match_a_hand_count():
    # LLaMA-2-7B q_proj: d = k = 4096, r = 16, 10 clients, float32 (4 bytes). r(d+k) = 16·8192 = 131072.
    d = k = 4096
    assert comm_bytes("fedit", d, k, 16, 10) == CommBytes(up=524_288, down=524_288)
    assert comm_bytes("florana", d, k, 16, 10) == CommBytes(up=524_288, down=524_288)
    assert comm_bytes("svd", d, k, 16, 10) == CommBytes(up=524_288, down=524_288)
    assert comm_bytes("ffa", d, k, 16, 10) == CommBytes(up=262_144, down=262_144)  # 4096·16·4
    assert comm_bytes("fedsa", d, k, 16, 10) == CommBytes(up=262_144, down=262_144)  # 16·4096·4
    assert comm_bytes("flora", d, k, 16, 10) == CommBytes(up=524_288, down=5_242_880)  # ×10 clients
    # FedEx: factors 131072 + residual min(4096², 11·131072 = 1441792) → 1572864 elements.
    assert comm_bytes("fedex", d, k, 16, 10) == CommBytes(up=524_288, down=6_291_456)
    # With 200 clients the factored residual (201·131072) exceeds dense 4096² = 16777216: dense wins.
    assert comm_bytes("fedex", d, k, 16, 200).down == (131_072 + 16_777_216) * 4
    # Half precision halves everything; rectangular shapes count d and k separately.
    assert comm_bytes("fedit", d, k, 16, 10, torch.bfloat16).up == 262_144
    assert comm_elements("ffa", 768, 3072, 8, 5) == (768 * 8, 768 * 8)
    assert comm_elements("fedsa", 768, 3072, 8, 5) == (8 * 3072, 8 * 3072)
    shapes = {"q": (4096, 4096), "v": (4096, 4096, 8)}
    assert model_comm_bytes("fedit", shapes, 16, 10) == CommBytes(524_288 + 262_144, 524_288 + 262_144)


def _core_round(method, U, r, d, k, w):
    """fedsb/ravan as their protocol calls them: shared bases (ravan: 4 heads of rank r) and each client's cores."""
    heads = 1 if method == "fedsb" else 4
    g = torch.Generator().manual_seed(U * 1000 + d)
    B, A = torch.randn(d, heads * r, generator=g), torch.randn(heads * r, k, generator=g)
    cores = [torch.randn(r, r, generator=g) if heads == 1 else torch.randn(heads, r, r, generator=g) for _ in range(U)]
    return aggregate(method, [B] * U, [A] * U, w, cores=cores, **({} if heads == 1 else {"heads": heads}))


@pytest.mark.parametrize("method", METHODS)
def test_result_down_bytes_agree_with_comm_bytes(method):
    U, r, d, k = 5, 3, 40, 24
    Bs, As, w = clients(U, r, d, k, seed=23, dtype=torch.float32)
    Bs, As = _inputs_for(method, Bs, As)
    if method in ("fedsb", "ravan"):  # what goes down is the averaged core
        assert _core_round(method, U, r, d, k, w).down_bytes() == comm_bytes(method, d, k, r, U).down
        assert _core_round(method, U, 2, 200, 150, w).down_bytes() == comm_bytes(method, 200, 150, 2, U).down
        return
    res = aggregate(method, Bs, As, w, **energy_threshold_one(method))
    assert res.down_bytes() == comm_bytes(method, d, k, r, U).down
    big = aggregate(method, *_inputs_for(method, *clients(U, 2, 200, 150, seed=24, dtype=torch.float32)[:2]),
                    w, **energy_threshold_one(method))
    assert big.down_bytes() == comm_bytes(method, 200, 150, 2, U).down


# ---------------------------------------------------------------------------------------------------------
# Never a d×k matrix


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (what torch allocates, including inside linalg)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gram_space_paths_never_allocate_a_d_by_k_matrix(dtype):
    U, r, d, k = 4, 4, 640, 512
    Bs, As, w = clients(U, r, d, k, seed=25, dtype=dtype, drift=0.3)
    limit = max(d, k) * (2 * U + 2) * r  # the widest stacked factor divergence() ever builds: 40 columns
    assert limit < d * k // 10
    calls = {
        "florana": lambda: aggregate("florana", Bs, As, w),
        "svd": lambda: aggregate("svd", Bs, As, w),
        "divergence": lambda: divergence(Bs, As, w, aggregate("florana", Bs, As, w)),
        "divergence(fedex)": lambda: divergence(Bs, As, w, aggregate("fedex", Bs, As, w)),
        "bound": lambda: eckart_young_bound(Bs, As, w),
    }
    for what, call in calls.items():
        with LargestAllocation() as rec:
            call()
        assert rec.numel <= limit, f"{what} allocated {rec.shape} in {rec.op}"
    # The recorder does see a dense d×k product, so the assertions above can fail.
    with LargestAllocation() as rec:
        aggregate("svd", Bs, As, w).delta()
    assert rec.shape == (d, k)


# ---------------------------------------------------------------------------------------------------------
# Errors a user can cause


def test_unknown_method_and_options():
    Bs, As, w = clients(2, 2, 6, 5, seed=26)
    with pytest.raises(ValueError, match=r"^unknown aggregation method 'fedavg'; choose one of fedit, ffa, fedsa"):
        aggregate("fedavg", Bs, As, w)
    with pytest.raises(ValueError, match=r"unknown option 'tol' for aggregation method 'fedit'; it takes none"):
        aggregate("fedit", Bs, As, w, tol=1e-3)
    with pytest.raises(ValueError, match=r"unknown option 'rnk' .*'svd'; it accepts rank"):
        aggregate("svd", Bs, As, w, rnk=3)
    with pytest.raises(ValueError, match=r"tol is -1; pass a finite number"):
        aggregate("florana", Bs, As, w, tol=-1)
    with pytest.raises(ValueError, match=r"rank is 0; pass an integer of at least 1"):
        aggregate("svd", Bs, As, w, rank=0)


def test_shape_errors_name_the_client_and_the_fix():
    Bs, As, w = clients(4, 8, 768, 12, seed=27)
    bad = list(Bs)
    bad[3] = torch.zeros(768, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"client 3's B for 'layer.0.query' is 768×4 but its A is 8×12"):
        aggregate("fedit", bad, As, w, name="layer.0.query")
    As4 = list(As)
    As4[3] = torch.zeros(4, 12, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"^client 3's B for 'layer.0.query' is 768×4 but client 0's is 768×8: every client must use the same rank r; "
        r"florana cannot combine clients of different ranks: use one of fedit, fedsa, flora, flexlora, hetlora, florist(, \w+)*$",
    ):
        aggregate("florana", bad, As4, w, name="layer.0.query")
    flora_ok = aggregate("flora", bad, As4, w)  # FLoRA stacks heterogeneous ranks
    assert flora_ok.B.shape == (768, 28) and divergence(bad, As4, w, flora_ok) < 1e-10
    wrong_k = list(As)
    wrong_k[1] = torch.zeros(8, 13, dtype=F64)
    with pytest.raises(ValueError, match=r"client 1's A is 8×13 but client 0's is 8×12: every client must adapt the same d×k"):
        aggregate("fedit", Bs, wrong_k, w)
    with pytest.raises(ValueError, match=r"has shape \(768,\), not 2-D"):
        aggregate("fedit", [Bs[0][:, 0]] + Bs[1:], As, w)
    with pytest.raises(ValueError, match=r"got 3 Bs but 4 As; pass one B and one A per client"):
        aggregate("fedit", Bs[:3], As, w)
    with pytest.raises(ValueError, match=r"^no client uploads were given; pass at least one client's factors$"):
        aggregate("fedit", [], [], torch.ones(0))
    with pytest.raises(ValueError, match=r"Bs is None but this method needs every client's B"):
        aggregate("fedit", None, As, w)
    mixed = list(As)
    mixed[2] = mixed[2].float()
    with pytest.raises(ValueError, match=r"client 2's A is torch.float32 but client 0's A is torch.float64"):
        aggregate("fedit", Bs, mixed, w)


def test_non_finite_uploads_are_refused():
    Bs, As, w = clients(3, 2, 6, 5, seed=28)
    As[2] = As[2].clone()
    As[2][0, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"^client 2's A for 'enc.v' contains NaN or Inf; drop or fix that client's upload$"
    ):
        aggregate("florana", Bs, As, w, name="enc.v")
    Bs[0] = Bs[0].clone()
    Bs[0][1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"client 0's B contains NaN or Inf"):
        aggregate("svd", Bs, As, w)


def test_weight_errors():
    Bs, As, _ = clients(3, 2, 6, 5, seed=29)
    with pytest.raises(ValueError, match=r"^weights sum to 0.93; pass weights that sum to 1 \(e.g. n_u / Σ n\)$"):
        aggregate("fedit", Bs, As, torch.tensor([0.5, 0.23, 0.2]))
    with pytest.raises(ValueError, match=r"weight 1 is -0.2; weights must be non-negative"):
        aggregate("fedit", Bs, As, torch.tensor([0.6, -0.2, 0.6]))
    with pytest.raises(ValueError, match=r"weights has 2 entries but there are 3 clients"):
        aggregate("fedit", Bs, As, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"weights contain NaN or Inf"):
        aggregate("fedit", Bs, As, torch.tensor([0.5, float("nan"), 0.5]))
    # Float32 weights n_u / Σn are accepted, and a zero weight is allowed.
    res = aggregate("fedit", Bs, As, torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float32))
    torch.testing.assert_close(res.B, Bs[1] / 3 + 2 * Bs[2] / 3)


# ---------------------------------------------------------------------------------------------------------
# The model-level wrapper


def model_uploads(U=3, seed=30, modules=(("q", 12, 10), ("v", 12, 10), ("fc", 20, 12)), r=2):
    g = torch.Generator().manual_seed(seed)
    Bs = [{m: torch.randn(d, r, generator=g, dtype=F64) for m, d, _ in modules} for _ in range(U)]
    As = [{m: torch.randn(r, k, generator=g, dtype=F64) for m, _, k in modules} for _ in range(U)]
    others = [{"head.weight": torch.randn(4, 12, generator=g, dtype=F64), "dora.m": torch.rand(12, generator=g, dtype=F64)}
              for _ in range(U)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)[:U]
    return Bs, As, others, w / w.sum()


def test_aggregate_model_matches_per_module_aggregation_and_averages_others():
    Bs, As, others, w = model_uploads()
    out = aggregate_model("florana", Bs, As, w, others, tol=1e-12)
    assert list(out.layers) == ["q", "v", "fc"]
    for m, agg in out.layers.items():
        ref = aggregate("florana", [B[m] for B in Bs], [A[m] for A in As], w, tol=1e-12)
        torch.testing.assert_close(agg.delta(), ref.delta(), rtol=0, atol=0)
    torch.testing.assert_close(out.others["head.weight"], sum(c * o["head.weight"] for c, o in zip(w, others)))
    torch.testing.assert_close(out.others["dora.m"], sum(c * o["dora.m"] for c, o in zip(w, others)))
    rho = out.divergence(Bs, As, w)
    assert set(rho) == {"q", "v", "fc"}
    for m in rho:
        assert rho[m] == pytest.approx(divergence([B[m] for B in Bs], [A[m] for A in As], w, out.layers[m]))
    exact = aggregate_model("fedex", Bs, As, w, others)
    assert max(exact.divergence(Bs, As, w).values()) < 1e-10
    expected = sum(a.down_bytes() for a in exact.layers.values()) + (4 * 12 + 12) * 8
    assert exact.down_bytes() == expected


@pytest.mark.parametrize("method", ["florana", "svd", "fedex"])
def test_aggregate_model_modules_in_parallel_give_the_sequential_result(method):
    Bs, As, others, w = model_uploads(modules=tuple((f"m{i}", 70, 66) for i in range(5)), r=3)
    threads = torch.get_num_threads()
    one = aggregate_model(method, Bs, As, w, others, workers=1)
    two = aggregate_model(method, Bs, As, w, others, workers=3)
    assert torch.get_num_threads() == threads  # restored after the pool
    assert list(two.layers) == list(one.layers)
    for m in one.layers:
        torch.testing.assert_close(two.layers[m].delta(), one.layers[m].delta(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="workers is 0"):
        aggregate_model(method, Bs, As, w, workers=0)


def test_gram_of_a_wide_stack_matches_the_full_product():
    from fedlora.aggregation._common import gram

    x = torch.randn(50, 130, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gram(x), x.T @ x, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(gram(x.T.contiguous(), rows=True), x.T @ x, rtol=1e-13, atol=1e-12)


def test_aggregate_model_keeps_others_local_and_fedsa_without_B():
    Bs, As, others, w = model_uploads()
    out = aggregate_model("fedsa", None, As, w, others, average_others=False)
    assert out.others == {} and out.personalised
    assert all(a.B is None and a.eval_B is None for a in out.layers.values())
    out = aggregate_model("fedsa", Bs, As, w)
    assert all(a.eval_B is not None for a in out.layers.values())


def test_aggregate_model_errors_name_client_and_module():
    Bs, As, others, w = model_uploads()
    del As[2]["v"]
    with pytest.raises(ValueError, match=r"^client 2's As lacks 'v', which client 0's As has; every client must upload the same modules$"):
        aggregate_model("fedit", Bs, As, w)
    Bs, As, others, w = model_uploads()
    Bs[1]["extra"] = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"client 1's Bs has 'extra', which client 0's As lacks"):
        aggregate_model("fedit", Bs, As, w)
    Bs, As, others, w = model_uploads()
    Bs[2]["fc"] = torch.zeros(20, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"client 2's B for 'fc' is 20×3 but its A is 2×12"):
        aggregate_model("fedit", Bs, As, w)
    Bs, As, others, w = model_uploads()
    others[1]["head.weight"] = torch.zeros(5, 12, dtype=F64)
    with pytest.raises(ValueError, match=r"client 1's 'head.weight' is \(5, 12\)"):
        aggregate_model("fedit", Bs, As, w, others)
    with pytest.raises(ValueError, match=r"unknown option 'rank' for aggregation method 'florana'"):
        aggregate_model("florana", Bs, As, w, rank=3)
