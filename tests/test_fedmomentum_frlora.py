"""FedMomentum and FRLoRA (METHODS.md): their identities against dense float64 references, the protocol's folds on
the tiny model, and both methods end to end (2 rounds × 3 clients) in-process and on the Flower app's in-process
round with equal metrics and bytes counted by hand."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from fedlora.aggregation import aggregate, comm_elements, divergence, eckart_young_bound, method_options
from fedlora.app.experiment import build
from fedlora.federation import REGISTRY
from fedlora.federation.protocol import FOLD, FOLD_L, FOLD_R, RoundContext, option_flags
from fedlora.federation.simulator import round_seed

F64 = torch.float64
D = K = 32  # tiny BERT: 4 adapted 32×32 matrices, rank 4, a 3-class head of 3·32 + 3 floats, float32
MODULES = 4
R = 4
HEAD = 3 * 32 + 3
F32 = 4
U = 3

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# Helpers: random uploads and the dense references


def clients(U, r, d, k, seed, *, drift=None, B_rank=None):
    """Random float64 uploads; ``drift``: clients near a common start; ``B_rank``: each B of that rank."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    if drift is None:
        Bs, As = [rnd(d, r) for _ in range(U)], [rnd(r, k) for _ in range(U)]
    else:
        B0, A0 = rnd(d, r), rnd(r, k)
        Bs = [B0 + drift * rnd(d, r) for _ in range(U)]
        As = [A0 + drift * rnd(r, k) for _ in range(U)]
    if B_rank is not None:
        Bs = [rnd(d, B_rank) @ rnd(B_rank, r) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.2
    return Bs, As, w / w.sum()


def ideal(Bs, As, w):
    return sum(float(c) * B.to(F64) @ A.to(F64) for c, B, A in zip(w, Bs, As))


def sq(M):
    return float(torch.linalg.matrix_norm(M)) ** 2


def dense_fedmomentum(M, r, tau):
    """The definition, on the dense matrix: [M]_r, and the fold σ_{r+1..m} with m the fewest components whose
    cumulative energy reaches τ‖M‖²."""
    Uf, S, Vh = torch.linalg.svd(M, full_matrices=False)
    energy = S.square()
    cum = torch.cumsum(energy, 0)
    m = int(torch.nonzero(cum >= tau * float(energy.sum()))[0]) + 1 if tau < 1 else int((S > 1e-12 * S[0]).sum())
    lora = (Uf[:, :r] * S[:r]) @ Vh[:r]
    fold = (Uf[:, r:m] * S[r:m]) @ Vh[r:m]
    return lora, fold, m, S


# ---------------------------------------------------------------------------------------------------------
# FedMomentum: the math


REGIMES = [dict(shape=(3, 4, 30, 20), drift=None), dict(shape=(5, 3, 24, 40), drift=0.3), dict(shape=(4, 2, 17, 9), drift=0.05),
           dict(shape=(3, 4, 8, 50), drift=None)]  # the last: d = 8 < Ur = 12, so ΔW* has rank ≤ 8


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 0.99, 0.9999])
@pytest.mark.parametrize("regime", range(len(REGIMES)))
def test_fedmomentum_is_the_truncated_svd_plus_the_fold_up_to_tau(regime, tau):
    case = REGIMES[regime]
    U_, r, d, k = case["shape"]
    Bs, As, w = clients(U_, r, d, k, seed=10 + regime, drift=case["drift"])
    target = ideal(Bs, As, w)
    res = aggregate("fedmomentum", Bs, As, w, tau=tau)
    lora, fold, m, S = dense_fedmomentum(target, r, tau)
    scale = float(S[0])
    # The new LoRA is [ΔW*]_r, split evenly: B̂ᵀB̂ = ÂÂᵀ = Σ_r (U_r Σ_r^{1/2}, Σ_r^{1/2} V_rᵀ).
    assert res.B.shape == (d, r) and res.A.shape == (r, k)
    torch.testing.assert_close(res.B @ res.A, lora, rtol=0, atol=1e-9 * scale)
    sigma_r = torch.diag(S[:r])
    torch.testing.assert_close(res.B.T @ res.B, sigma_r, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(res.A @ res.A.T, sigma_r, rtol=0, atol=1e-9 * scale)
    # The fold is components r+1..m, and only those.
    assert res.info["fold_rank"] == max(m - r, 0)
    if m <= r:
        assert res.base_delta_factors is None
    else:
        L, Rf = res.base_delta_factors
        assert L.shape == (d, m - r) and Rf.shape == (m - r, k)
        torch.testing.assert_close(res.base_delta, fold, rtol=0, atol=1e-9 * scale)
    # ‖ΔW* − ΔŴ‖² ≤ (1 − τ)‖ΔW*‖², and the fold is the shortest that gets there: one component less misses τ.
    err2, total = sq(target - res.delta()), sq(target)
    assert err2 <= (1 - tau) * total + 1e-12 * total
    if m > r:
        assert err2 + float(S[m - 1]) ** 2 > (1 - tau) * total
    assert res.info["energy_kept"] == pytest.approx(1 - err2 / total, abs=1e-9)
    # The divergence reads the fold too, and beats the Eckart–Young bound exactly when something is folded.
    rho = divergence(Bs, As, w, res)
    assert rho == pytest.approx(math.sqrt(err2 / total), rel=1e-7, abs=1e-12)
    bound = eckart_young_bound(Bs, As, w)
    assert rho <= bound + 1e-9 and (m <= r or rho < bound)


@pytest.mark.parametrize("regime", range(len(REGIMES)))
def test_fedmomentum_with_tau_one_is_exact(regime):
    case = REGIMES[regime]
    U_, r, d, k = case["shape"]
    Bs, As, w = clients(U_, r, d, k, seed=20 + regime, drift=case["drift"])
    res = aggregate("fedmomentum", Bs, As, w, tau=1.0)
    target = ideal(Bs, As, w)
    assert math.sqrt(sq(target - res.delta()) / sq(target)) < 1e-10
    assert divergence(Bs, As, w, res) < 1e-10
    assert res.info["rank"] == min(U_ * r, d, k) and res.info["fold_rank"] == min(U_ * r, d, k) - r


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 40), st.integers(1, 40), st.sampled_from([0.5, 0.9, 0.9999, 1.0]),
       st.sampled_from([None, 1.0, 0.01]), st.integers(0, 2**31 - 1))
def test_fedmomentum_energy_bound_on_random_shapes(U_, r, d, k, tau, drift, seed):
    Bs, As, w = clients(U_, r, d, k, seed, drift=drift)
    res = aggregate("fedmomentum", Bs, As, w, tau=tau)
    target = ideal(Bs, As, w)
    err2, total = sq(target - res.delta()), sq(target)
    assert res.B.shape == (d, r) and res.A.shape == (r, k)  # zero-padded where ΔW* has fewer than r components
    assert err2 <= (1 - tau) * total + 1e-11 * total
    f = res.info["fold_rank"]
    assert res.down_elements() == r * (d + k) + min(d * k, f * (d + k)) <= comm_elements("fedmomentum", d, k, r, U_)[1]


def test_fedmomentum_with_fewer_components_than_r_pads_with_zeros():
    # Two clients whose B have rank 1: ΔW* has rank 2 < r = 4 (FedLLM-Factory crashes here).
    Bs, As, w = clients(2, 4, 20, 16, seed=30, B_rank=1)
    for tau in (0.9999, 1.0):
        res = aggregate("fedmomentum", Bs, As, w, tau=tau)
        assert res.info["rank"] == 2 and res.info["fold_rank"] == 0 and res.base_delta_factors is None
        assert res.B.shape == (20, 4) and res.A.shape == (4, 16)
        assert torch.count_nonzero(res.B[:, 2:]) == 0 and torch.count_nonzero(res.A[2:]) == 0
        assert torch.count_nonzero(res.B[:, :2]) > 0
        torch.testing.assert_close(res.delta(), ideal(Bs, As, w), rtol=0, atol=1e-10 * float(ideal(Bs, As, w).norm()))
    # ΔW* = 0 (every B zero, round one): a zero update, nothing folded, no NaN.
    Bs0 = [torch.zeros_like(B) for B in Bs]
    res = aggregate("fedmomentum", Bs0, As, w)
    assert torch.count_nonzero(res.delta()) == 0 and res.base_delta_factors is None and res.info["rank"] == 0
    assert divergence(Bs0, As, w, res) == 0.0
    # One client of rank r: the whole update is the new LoRA.
    Bs1, As1, w1 = clients(1, 3, 12, 10, seed=31)
    res = aggregate("fedmomentum", Bs1, As1, w1, tau=1.0)
    assert res.base_delta_factors is None and divergence(Bs1, As1, w1, res) < 1e-10


def test_fedmomentum_tau_option_is_checked_and_reaches_the_rule(small_csv):
    Bs, As, w = clients(3, 2, 12, 10, seed=32)
    assert method_options("fedmomentum") == {"tau": 0.9999}
    with pytest.raises(ValueError, match=r"^FedMomentum energy threshold tau is 1.5; pass a number in \[0, 1\]"):
        aggregate("fedmomentum", Bs, As, w, tau=1.5)
    assert aggregate("fedmomentum", Bs, As, w, tau=0.0).base_delta_factors is None  # τ = 0: the svd rule
    torch.testing.assert_close(aggregate("fedmomentum", Bs, As, w, tau=0.0).delta(), aggregate("svd", Bs, As, w).delta())
    assert "fedmomentum-tau" in option_flags()
    method = tiny_config(small_csv, method="fedmomentum", method_options="fedmomentum-tau=0.5").validate().make_method()
    assert method.rule_options == {"tau": 0.5}
    with pytest.raises(ValueError, match="tau is 2.0"):
        tiny_config(small_csv, method="fedmomentum", method_options="fedmomentum-tau=2").validate()


def test_neither_rule_forms_a_d_by_k_matrix():
    from test_aggregation import LargestAllocation

    U_, r, d, k = 4, 4, 640, 512
    Bs, As, w = clients(U_, r, d, k, seed=33, drift=0.3)
    limit = max(d, k) * (2 * U_ + 2) * r  # the widest stacked factor divergence() builds
    for what, call in {
        "fedmomentum": lambda: aggregate("fedmomentum", Bs, As, w, tau=1.0),
        "divergence(fedmomentum)": lambda: divergence(Bs, As, w, aggregate("fedmomentum", Bs, As, w, tau=1.0)),
        "frlora": lambda: aggregate("frlora", Bs, As, w),
        "divergence(frlora)": lambda: divergence(Bs, As, w, aggregate("frlora", Bs, As, w)),
    }.items():
        with LargestAllocation() as rec:
            call()
        assert rec.numel <= limit < d * k // 10, f"{what} allocated {rec.shape} in {rec.op}"


# ---------------------------------------------------------------------------------------------------------
# FRLoRA: the math


@pytest.mark.parametrize("shape", [(3, 4, 30, 20), (5, 2, 9, 33), (2, 3, 4, 4)])
def test_frlora_folds_fedits_product_and_sends_only_the_fold(shape):
    U_, r, d, k = shape
    Bs, As, w = clients(U_, r, d, k, seed=sum(shape), drift=0.3)
    res = aggregate("frlora", Bs, As, w)
    B_bar = sum(float(c) * B for c, B in zip(w, Bs))
    A_bar = sum(float(c) * A for c, A in zip(w, As))
    torch.testing.assert_close(res.base_delta, B_bar @ A_bar, rtol=1e-12, atol=1e-12)
    # The LoRA every client restarts from has B = 0: the round's whole effect is the fold.
    assert res.B.shape == (d, r) and res.A.shape == (r, k) and torch.count_nonzero(res.B) == 0
    torch.testing.assert_close(res.delta(), aggregate("fedit", Bs, As, w).delta(), rtol=1e-12, atol=1e-12)
    rho = divergence(Bs, As, w, res)
    assert rho == pytest.approx(divergence(Bs, As, w, aggregate("fedit", Bs, As, w)), rel=1e-9) and rho > 1e-3
    # Down: the fold only, dense when d·k < r(d+k) (the 4×4 case at r = 3: 16 < 24).
    assert res.down_elements() == min(d * k, r * (d + k)) == comm_elements("frlora", d, k, r, U_)[1]
    assert comm_elements("frlora", d, k, r, U_)[0] == r * (d + k)


def test_frlora_fold_carries_the_whole_update_relative_to_the_start(small_csv):
    """On the tiny model with a start B_0 ≠ 0 (which PEFT's init never gives, so the general case is checked
    here): after the server's fold and the re-init, W0' + s·B'A' = (W0 + s·B_0A_0) + s·(B̄Ā − B_0A_0)."""
    exp = build(tiny_config(small_csv, method="frlora"))
    sim, h, method = exp.simulator, exp.simulator.handle, exp.simulator.method
    g = torch.Generator().manual_seed(34)
    current = dict(sim.global_tensors)
    for k in h.keys.values():
        current[k.B] = 0.1 * torch.randn(current[k.B].shape, generator=g)
    uploads = []
    for _ in range(U):
        up = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in current.items()}
        uploads.append(up)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    base = {m: layer.get_base_layer().weight.detach().to(F64).clone() for m, layer in h.layers.items()}
    seed = 1234
    update = method.aggregate(h, uploads, w, current, RoundContext(1, seed, sim.peers))
    sent = set(update.broadcast)
    assert not sent & set(h.B_names() + h.A_names())  # B̄, Ā go down only as the fold
    assert set(h.head_names) <= sent
    method.fold(h, update.broadcast)
    new = method.take(h, update.broadcast, current, sim.server, seed)
    fresh = h.fresh_factors(seed)
    for m, k in h.keys.items():
        s = h.scaling(m)
        assert s == 16.0 / 4
        B0, A0 = current[k.B].to(F64), current[k.A].to(F64)
        B_bar = sum(float(c) * u[k.B].to(F64) for c, u in zip(w, uploads))
        A_bar = sum(float(c) * u[k.A].to(F64) for c, u in zip(w, uploads))
        start = base[m] + s * B0 @ A0
        want = start + s * (B_bar @ A_bar - B0 @ A0)
        got = h.layers[m].get_base_layer().weight.detach().to(F64) + s * new[k.B].to(F64) @ new[k.A].to(F64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert float((s * B0 @ A0).abs().max()) > 1e-2  # the start's product is far above that tolerance
        assert torch.count_nonzero(new[k.B]) == 0 and torch.equal(new[k.A], fresh[k.A])
    for name in h.head_names:
        torch.testing.assert_close(new[name], sum(float(c) * u[name] for c, u in zip(w, uploads)))


# ---------------------------------------------------------------------------------------------------------
# End to end: 2 rounds × 3 clients, in-process and on the Flower app's in-process round


def run_recording(sim):
    """Run the simulator round by round, recording each round's server inputs and update, the base weights
    before and after it, and what the server's model and every client hold after it."""
    h, rounds = sim.handle, []
    original = sim.method.aggregate

    def spy(h_, uploads, weights, current, ctx):
        update = original(h_, uploads, weights, current, ctx)
        rounds[-1].update(uploads=uploads, weights=weights, current=current, update=update, seed=ctx.seed)
        return update

    sim.method.aggregate = spy
    for rnd in (1, 2):
        before = {m: layer.get_base_layer().weight.detach().clone() for m, layer in h.layers.items()}
        rounds.append({"before": before})
        sim.round(rnd)
        rounds[-1]["after"] = {m: layer.get_base_layer().weight.detach().clone() for m, layer in h.layers.items()}
        rounds[-1]["views"] = [dict(sim.global_tensors), *(dict(v) for v in sim.held.values())]  # server, clients
    del sim.method.aggregate
    return rounds


def sent_fold(broadcast, module):
    if f"{module}.{FOLD_L}" in broadcast:
        return broadcast[f"{module}.{FOLD_L}"].to(F64) @ broadcast[f"{module}.{FOLD_R}"].to(F64)
    if f"{module}.{FOLD}" in broadcast:
        return broadcast[f"{module}.{FOLD}"].to(F64)
    return None


def assert_flower_equal(cfg, history, tmp_path):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    # fresh=True: client processes restart every message, so the folds must survive in context.state
    flower = run_federation(InlineGrid(cfg, fresh=True), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, history)


@pytest.mark.parametrize("adapter,tau", [("lora", None), ("rslora", 1.0)])
def test_fedmomentum_end_to_end_in_process_and_on_flower(small_csv, tmp_path, adapter, tau):
    options = "" if tau is None else f"fedmomentum-tau={tau}"
    cfg = tiny_config(small_csv, method="fedmomentum", adapter=adapter, method_options=options)
    exp = build(cfg)
    sim, h = exp.simulator, exp.simulator.handle
    tau = 0.9999 if tau is None else tau
    assert sim.method.rule_options == {"tau": tau}
    rounds = run_recording(sim)
    s = {"lora": 16.0 / 4, "rslora": 16.0 / 2}[adapter]
    folded = 0
    for rec, metrics in zip(rounds, sim.history):
        update, broadcast = rec["update"], rec["update"].broadcast
        down = 0
        for m, k in h.keys.items():
            layer = update.layers[m]
            f = layer.info["fold_rank"]
            folded += f
            fold = sent_fold(broadcast, m)
            # The base moved by exactly s·L R (α/r carried: the public code folds without it), and not at all
            # where nothing was folded.
            assert h.scaling(m) == s
            step = (rec["after"][m] - rec["before"][m]).to(F64)
            if f == 0:
                assert fold is None and torch.count_nonzero(step) == 0
            else:
                assert broadcast[f"{m}.{FOLD_L}"].shape == (D, f) and broadcast[f"{m}.{FOLD_R}"].shape == (f, K)
                # float32 rounding of W0 + s·L R: a few ulps of W0, far below the (1 − 1/s)·s·L R a missing α/r leaves
                ulps = 4 * torch.finfo(torch.float32).eps * float(rec["before"][m].abs().max())
                torch.testing.assert_close(step, s * fold, rtol=0, atol=ulps + 1e-6 * s * float(fold.abs().max()))
                assert ulps < 0.01 * (s - 1) * float(fold.abs().max())
            # Every client holds the new LoRA B̂, Â; B̂Â + fold is ΔW* up to the energy left out.
            for view in rec["views"]:
                assert torch.equal(view[k.B], broadcast[k.B]) and torch.equal(view[k.A], broadcast[k.A])
            target = ideal([u[k.B] for u in rec["uploads"]], [u[k.A] for u in rec["uploads"]], rec["weights"])
            got = broadcast[k.B].to(F64) @ broadcast[k.A].to(F64) + (0 if fold is None else fold)
            assert sq(target - got) <= (1 - tau) * sq(target) + 1e-10 * sq(target)
            down += R * (D + K) + min(D * K, f * (D + K))
        assert metrics["divergence"] <= math.sqrt(1 - tau) + 1e-5
        assert metrics["bytes_up"] == U * F32 * (MODULES * R * (D + K) + HEAD)
        assert metrics["bytes_down"] == U * F32 * (down + HEAD)
    assert folded > 0  # something was folded, so the checks above could fail
    if tau == 1.0:  # round 2: ΔW* of full rank Ur = 12 in every module, so f = Ur − r = 8 everywhere
        assert [rounds[1]["update"].layers[m].info["fold_rank"] for m in h.keys] == [8] * MODULES
        assert sim.history[1]["bytes_down"] == U * F32 * (MODULES * (R * (D + K) + 8 * (D + K)) + HEAD)
        assert all(m["divergence"] < 1e-5 for m in sim.history)
    assert_flower_equal(cfg, sim.history, tmp_path)


@pytest.mark.parametrize("adapter", ["lora", "rslora", "hira"])
def test_frlora_end_to_end_in_process_and_on_flower(small_csv, tmp_path, adapter):
    cfg = tiny_config(small_csv, method="frlora", adapter=adapter)
    exp = build(cfg)
    sim, h = exp.simulator, exp.simulator.handle
    rounds = run_recording(sim)
    s = {"lora": 16.0 / 4, "rslora": 16.0 / 2, "hira": 1.0}[adapter]
    for rnd, (rec, metrics) in enumerate(zip(rounds, sim.history), start=1):
        broadcast = rec["update"].broadcast
        assert set(broadcast) == set(h.head_names) | {f"{m}.{FOLD_L}" for m in h.keys} | {f"{m}.{FOLD_R}" for m in h.keys}
        fresh = h.fresh_factors(round_seed(cfg.seed, rnd))
        for m, k in h.keys.items():
            B_bar = sum(float(c) * u[k.B].to(F64) for c, u in zip(rec["weights"], rec["uploads"]))
            A_bar = sum(float(c) * u[k.A].to(F64) for c, u in zip(rec["weights"], rec["uploads"]))
            assert torch.count_nonzero(rec["current"][k.B]) == 0  # every round starts from B_0 = 0 (PEFT's init)
            W0 = rec["before"][m].to(F64)
            # The effective weight after the round, W0' + s·B'A' with B' = 0, is W0 + s·B̄Ā (HiRA: W0 + W0 ⊙ B̄Ā).
            want = W0 + (W0 * (B_bar @ A_bar) if adapter == "hira" else s * B_bar @ A_bar)
            after = rec["after"][m].to(F64)
            atol = 1e-6 * float(want.abs().max())
            torch.testing.assert_close(after, want, rtol=0, atol=atol)
            assert float((after - W0).abs().max()) > 100 * atol  # the fold is far above the tolerance
            assert h.scaling(m) == s
            # Every client (and the server) re-initialised from the round's seed: B = 0, the fresh A.
            for view in rec["views"]:
                assert torch.count_nonzero(view[k.B]) == 0 and torch.equal(view[k.A], fresh[k.A])
        if rnd == 2:  # a new draw each round
            name = h.A_names()[0]
            assert not torch.equal(rounds[0]["current"][name], rec["current"][name])
        # FRLoRA folds FedIT's product: its divergence is FedIT's, on the same uploads.
        assert metrics["divergence"] == pytest.approx(metrics["fedit_divergence"], rel=1e-9) and metrics["divergence"] > 0
        # Up: both factors and the head. Down: the fold (factored: r(d+k) = 256 < dk = 1024) and the head.
        assert metrics["bytes_up"] == U * F32 * (MODULES * R * (D + K) + HEAD)
        assert metrics["bytes_down"] == U * F32 * (MODULES * min(D * K, R * (D + K)) + HEAD)
    assert_flower_equal(cfg, sim.history, tmp_path)


def test_frlora_sends_the_fold_dense_when_that_is_cheaper(small_csv):
    # r = 20 on 32×32: r(d+k) = 1280 > d·k = 1024, so each fold goes down dense.
    r = 20
    exp = build(tiny_config(small_csv, method="frlora", rank=r))
    history = exp.simulator.run()
    h = exp.simulator.handle
    for metrics in history:
        assert metrics["bytes_up"] == U * F32 * (MODULES * r * (D + K) + HEAD)
        assert metrics["bytes_down"] == U * F32 * (MODULES * D * K + HEAD)
    assert all(torch.count_nonzero(exp.simulator.global_tensors[name]) == 0 for name in h.B_names())


def test_traits_are_declared():
    fm, fr = REGISTRY["fedmomentum"], REGISTRY["frlora"]
    assert not fm.exact and fm.exact_text() == "up to the energy threshold τ" and not fm.linear and not fm.mixed_ranks
    assert fm.adapters() == ("lora", "rslora")
    assert not fr.exact and fr.linear and not fr.mixed_ranks
    assert fr.adapters() == ("lora", "rslora", "hira")
