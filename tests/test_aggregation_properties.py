"""Property tests of the aggregation rules over random clients: U ∈ 1..8, r ∈ 1..8, d and k from r to 64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.aggregation import METHODS, aggregate, comm_bytes, divergence, eckart_young_bound
from test_aggregation import SHARED_A

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread: these matrices are tiny


@st.composite
def uploads(draw):
    U = draw(st.integers(1, 8))
    r = draw(st.integers(1, 8))
    d = draw(st.integers(r, 64))
    k = draw(st.integers(r, 64))
    regime = draw(st.sampled_from(["independent", "drift 1", "drift 0.3", "drift 0.03", "B zero", "shared A"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if regime.startswith("drift"):
        eps = float(regime.split()[1])
        B0, A0 = rnd(d, r), rnd(r, k)
        Bs = [B0 + eps * rnd(d, r) for _ in range(U)]
        As = [A0 + eps * rnd(r, k) for _ in range(U)]
    else:
        Bs = [rnd(d, r) * (0 if regime == "B zero" else 1) for _ in range(U)]
        As = [rnd(r, k) for _ in range(U)]
        if regime == "shared A":
            As = [As[0]] * U
    w = torch.rand(U, generator=g, dtype=F64) + 0.05
    return Bs, As, w / w.sum(), regime


def ideal(Bs, As, w):
    return sum(float(c) * B @ A for c, B, A in zip(w, Bs, As))


@SETTINGS
@given(uploads())
def test_exact_methods_are_exact(case):
    Bs, As, w, regime = case
    for method in ("fedex", "flora") + (SHARED_A if regime == "shared A" else ()):
        res = aggregate(method, Bs, As, w)
        assert divergence(Bs, As, w, res) < 1e-10, method
        err = torch.linalg.matrix_norm(res.delta() - ideal(Bs, As, w))
        assert err <= 1e-10 * torch.linalg.matrix_norm(ideal(Bs, As, w)) + 1e-300, method


@SETTINGS
@given(uploads())
def test_bound_le_svd_le_florana_le_fedit(case):
    Bs, As, w, _ = case
    r = Bs[0].shape[1]
    bound = eckart_young_bound(Bs, As, w)
    target = ideal(Bs, As, w)
    s = torch.linalg.svdvals(target)
    dense = float(torch.linalg.vector_norm(s[r:]) / torch.linalg.vector_norm(s)) if s.norm() > 0 else 0.0
    assert abs(bound - dense) <= 1e-9 * dense + 1e-12
    rho = {m: divergence(Bs, As, w, aggregate(m, Bs, As, w)) for m in ("svd", "florana", "fedit")}
    assert abs(rho["svd"] - bound) <= 1e-7 * bound + 1e-9
    assert bound - 1e-9 <= rho["florana"] <= rho["fedit"] + 1e-9
    if len(Bs) == 1:
        assert max(rho.values()) < 1e-9


@SETTINGS
@given(uploads(), st.sampled_from(METHODS))
def test_divergence_equals_its_dense_definition(case, method):
    Bs, As, w, regime = case
    if method in SHARED_A and regime != "shared A":
        As = [As[0]] * len(As)
    res = aggregate(method, Bs, As, w)
    target = ideal(Bs, As, w)
    norm = float(torch.linalg.matrix_norm(target))
    err = float(torch.linalg.matrix_norm(target - res.delta()))
    rho = divergence(Bs, As, w, res)
    if norm == 0.0:
        assert rho == 0.0 and err == 0.0
    else:
        assert abs(rho - err / norm) <= 1e-8 * (err / norm) + 1e-12


@SETTINGS
@given(uploads(), st.sampled_from(METHODS))
def test_results_are_finite_shaped_and_cost_what_comm_bytes_says(case, method):
    Bs, As, w, regime = case
    if method in SHARED_A and regime != "shared A":
        As = [As[0]] * len(As)
    U, (d, r), k = len(Bs), Bs[0].shape, As[0].shape[1]
    res = aggregate(method, Bs, As, w)
    for t in (res.B, res.A, res.eval_B, res.p, res.q):
        assert t is None or bool(torch.isfinite(t).all())
    if method not in ("flora", "fedsa"):
        assert res.B.shape == (d, r)
    assert res.A.shape == ((U * r, k) if method == "flora" else (r, k))
    if method in ("fedsb", "ravan"):  # given the clients' B·C_u rather than cores, nothing says what the core was
        assert res.frozen_A and res.core is None
    elif "fold_rank" in res.info:  # fedmomentum: the declared count is the bound; the fold's rank f depends on the data
        f = res.info["fold_rank"]
        assert res.down_bytes() == 8 * (r * (d + k) + min(d * k, f * (d + k))) <= comm_bytes(method, d, k, r, U, F64).down
    elif "kept_rank" in res.info:  # florist: the fold [ΔW*]_p alone, p ≤ min(Ur, d, k) the kept rank (the declared bound)
        p = res.info["kept_rank"]
        assert res.down_bytes() == 8 * min(d * k, p * (d + k)) <= comm_bytes(method, d, k, r, U, F64).down
    else:
        assert res.down_bytes() == comm_bytes(method, d, k, r, U, F64).down
    if res.p is not None and res.B is not None:
        torch.testing.assert_close(res.B, sum(float(c) * B for c, B in zip(res.p, Bs)), rtol=1e-9, atol=1e-12)


@SETTINGS
@given(uploads())
def test_florana_history_never_increases(case):
    Bs, As, w, _ = case
    res = aggregate("florana", Bs, As, w, restarts=2)
    hist = res.info["objective"]
    assert all(b <= a for a, b in zip(hist, hist[1:]))
    if res.info["fell_back_to_fedit"]:
        torch.testing.assert_close(res.p, w, rtol=0, atol=0)
