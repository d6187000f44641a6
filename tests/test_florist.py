"""FLoRIST (METHODS.md, wave 3): the fold is the energy-thresholded truncation [ΔW*]_p against a brute-force dense
SVD (float64, small shapes: the d×k matrices are formed here, never in the library), p = 0 for ΔW* = 0, τ = 1 is
FLoRA's fold, bytes by hand; the protocol's folds and fresh restarts at each client's rank on the tiny model, 2 rounds
× 3 clients in-process and on the Flower app's in-process round with equal metrics, a resumed run, the export."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import resume_matches, tiny_config
from fedlora.aggregation import aggregate, comm_elements
from fedlora.app.experiment import build
from fedlora.federation import REGISTRY, make_method
from fedlora.federation.protocol import FOLD, FOLD_L, FOLD_R
from fedlora.federation.simulator import round_seed

F64 = torch.float64
D = K = 32  # tiny BERT: 4 adapted 32×32 matrices, a 3-class head of 3·32 + 3 floats, float32
MODULES = 4
R = 4
HEAD = 3 * 32 + 3
F32 = 4
U = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def uploads(ranks, d, k, seed, *, decay=1.0):
    """Random float64 factors at the given ranks; ``decay`` < 1 gives ΔW* a spread-out spectrum."""
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64) * decay ** torch.arange(r, dtype=F64) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=F64) for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=F64) + 0.2
    return Bs, As, w / w.sum()


def dense_truth(Bs, As, w, scales, tau):
    """ΔW* = Σ w_u s_u B_u A_u formed densely, its singular values, p by the definition, and [ΔW*]_p."""
    M = sum(float(c) * s * B @ A for c, s, B, A in zip(w, scales, Bs, As))
    Uf, S, Vh = torch.linalg.svd(M, full_matrices=False)
    energy = S.square()
    nonzero = int((S > S[0] * 1e-10).sum()) if float(S[0]) > 0 else 0
    cum = torch.cumsum(energy[:nonzero], 0)
    p = 0 if nonzero == 0 else min(int(torch.nonzero(cum >= tau * float(cum[-1]))[0]) + 1, nonzero)
    return M, S, p, (Uf[:, :p] * S[:p]) @ Vh[:p]


def fold_of(res):
    return torch.zeros(res.B.shape[0], res.A.shape[1], dtype=F64) if res.base_delta_factors is None else res.base_delta


# ---- the math ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), d=st.integers(3, 14), k=st.integers(3, 14),
       seed=st.integers(0, 10_000), tau=st.sampled_from([0.3, 0.5, 0.8, 0.9, 0.95, 0.99]), mixed=st.booleans())
def test_the_fold_is_the_truncation_holding_tau_of_the_energy(ranks, d, k, seed, tau, mixed):
    Bs, As, w = uploads(ranks, d, k, seed, decay=0.6)
    scales = [16.0 / r for r in ranks] if mixed else [1.0] * len(ranks)
    M, S, p, best = dense_truth(Bs, As, w, scales, tau)
    energy = S.square()
    cum = torch.cumsum(energy, 0) / energy.sum()
    if p > 1 and abs(float(cum[p - 2]) - tau) < 1e-9:  # a crossing within rounding: which p is a coin toss
        return
    res = aggregate("florist", Bs, As, w, scales=scales if mixed else None, tau=tau)
    assert res.info["kept_rank"] == p and res.clients is None  # every client receives the same fold
    assert not res.B.any() and not res.A.any()  # the restart: a fresh LoRA, B = 0
    F = fold_of(res)
    assert res.base_delta_factors[0].shape == (d, p) and res.base_delta_factors[1].shape == (p, k)
    torch.testing.assert_close(F, best, rtol=0, atol=1e-8 * float(S[0]))  # F = [ΔW*]_p (Eckart–Young at p)
    E_p = float(energy[:p].sum() / energy.sum())
    assert res.info["energy_kept"] == pytest.approx(E_p, abs=1e-9)
    rel = float(torch.linalg.matrix_norm(M - F) / torch.linalg.matrix_norm(M))
    assert rel == pytest.approx(math.sqrt(max(1 - E_p, 0.0)), abs=1e-6) and rel <= math.sqrt(1 - tau) + 1e-9
    assert torch.allclose(res.delta(), F)  # what the metrics measure: B̂Â (zero) plus the fold


@pytest.mark.parametrize("mixed", [False, True])
def test_tau_one_folds_what_flora_folds(mixed):
    ranks = [2, 4, 3] if mixed else [4, 4, 4]
    Bs, As, w = uploads(ranks, 11, 9, seed=3)
    scales = [16.0 / r for r in ranks] if mixed else None
    res = aggregate("florist", Bs, As, w, scales=scales, tau=1.0)
    flora = aggregate("flora", Bs, As, w, scales=scales)
    assert res.info["kept_rank"] == min(sum(ranks), 9) and res.info["energy_kept"] == pytest.approx(1.0)
    torch.testing.assert_close(fold_of(res), flora.B @ flora.A, rtol=0, atol=1e-10)
    lower = aggregate("florist", Bs, As, w, scales=scales, tau=0.5)  # and a lower τ folds less
    assert 0 < lower.info["kept_rank"] < res.info["kept_rank"]


def test_nothing_is_folded_when_the_ideal_update_is_zero():
    Bs, As, w = uploads([4, 4, 4], 10, 8, seed=4)
    for zero in ([torch.zeros_like(B) for B in Bs], As), (Bs, [torch.zeros_like(A) for A in As]):
        res = aggregate("florist", *zero, w)
        assert res.info["kept_rank"] == 0 and res.base_delta_factors is None and res.down_elements() == 0
        assert res.info["energy_kept"] == 1.0 and not res.delta().any()


@pytest.mark.parametrize("d,k,r,U_,tau", [(40, 30, 4, 3, 0.9), (12, 10, 4, 4, 1.0), (64, 48, 8, 2, 0.5)])
def test_bytes_are_the_fold_by_hand_within_the_declared_bound(d, k, r, U_, tau):
    Bs, As, w = uploads([r] * U_, d, k, seed=5)
    res = aggregate("florist", Bs, As, w, tau=tau)
    p = res.info["kept_rank"]
    assert p > 0 and res.down_elements() == min(d * k, p * (d + k))
    up, down = comm_elements("florist", d, k, r, U_)
    assert up == r * (d + k) and down == min(d * k, min(U_ * r, d, k) * (d + k)) >= res.down_elements()
    if tau == 1.0:  # ΔW* of full rank min(U·r, d, k) = 10: the bound is reached, and sent dense (dk < p(d+k))
        assert p == 10 and res.down_elements() == down == d * k


def test_bad_tau_and_adapters_fail_in_one_line():
    Bs, As, w = uploads([2, 2], 6, 5, seed=6)
    for tau in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"FLoRIST energy threshold tau is .*; pass a number in \(0, 1\]"):
            aggregate("florist", Bs, As, w, tau=tau)
    with pytest.raises(ValueError, match=r"option tau=0.0 of method florist: .*e.g. florist-tau=0.9"):
        make_method("florist", tau=0.0)
    for adapter in ("vera", "dora"):
        with pytest.raises(ValueError, match=f"method florist does not support adapter {adapter}: .*use lora, rslora or hira"):
            make_method("florist", adapter)
    cls = REGISTRY["florist"]
    assert cls.adapters() == ("lora", "rslora", "hira") and cls.mixed_ranks and not cls.exact and not cls.linear
    assert cls.exact_text() == "up to the energy threshold τ"
    assert make_method("florist").rule_options == {"tau": 0.9}


# ---- the protocol on the tiny model --------------------------------------------------------------------------


def run_recording(sim):
    """Run round by round; per round the uploads, the update, each base weight before and after, every view after."""
    h, rounds = sim.handle, []
    original = sim.method.aggregate

    def spy(h_, ups, weights, current, ctx):
        update = original(h_, ups, weights, current, ctx)
        rounds[-1].update(uploads=ups, weights=weights, update=update, peers=ctx.peers)
        return update

    sim.method.aggregate = spy
    for rnd in (1, 2):
        rounds.append({"before": {m: h.base_layout(m, layer.get_base_layer().weight).detach().clone() for m, layer in h.layers.items()}})
        sim.round(rnd)
        rounds[-1]["after"] = {m: h.base_layout(m, layer.get_base_layer().weight).detach().clone() for m, layer in h.layers.items()}
        rounds[-1]["views"] = {**{cid: dict(v) for cid, v in sim.held.items()}, -1: dict(sim.global_tensors)}
    del sim.method.aggregate
    return rounds


def sent_fold(broadcast, module):
    if f"{module}.{FOLD_L}" in broadcast:
        return broadcast[f"{module}.{FOLD_L}"].to(F64) @ broadcast[f"{module}.{FOLD_R}"].to(F64)
    return broadcast[f"{module}.{FOLD}"].to(F64) if f"{module}.{FOLD}" in broadcast else None


@pytest.mark.parametrize("adapter,ranks,tau", [("lora", "", 0.9), ("rslora", "2,4", 0.8), ("hira", "4,2", 0.9), ("lora", "", 1.0)])
def test_two_rounds_three_clients_in_process_and_on_flower(small_csv, tmp_path, adapter, ranks, tau):
    cfg = tiny_config(small_csv, method="florist", adapter=adapter, client_ranks=ranks, method_options=f"florist-tau={tau}")
    sim = build(cfg).simulator
    h = sim.handle
    rounds = run_recording(sim)
    for rnd, (rec, metrics) in enumerate(zip(rounds, sim.history), start=1):
        broadcast, layers = rec["update"].broadcast, rec["update"].layers
        fresh = h.fresh_factors(round_seed(cfg.seed, rnd))
        down = 0
        for m, k in h.keys.items():
            p = layers[m].info["kept_rank"]
            assert metrics["florist_rank_per_layer"][m] == p > 0
            assert metrics["florist_energy_per_layer"][m] == pytest.approx(layers[m].info["energy_kept"]) and layers[m].info["energy_kept"] >= tau - 1e-9
            # ΔW* in the scaled space (s_u of each client's rank), its truncation at p, and the base's move: s·F (HiRA W0 ⊙ F)
            scales = [h.spec.scale_at(peer.rank) for peer in rec["peers"]]
            Bs, As = [u[k.B].to(F64) for u in rec["uploads"]], [u[k.A].to(F64) for u in rec["uploads"]]
            M, S, p_dense, best = dense_truth(Bs, As, rec["weights"], scales, tau)
            assert p == p_dense
            F = sent_fold(broadcast, m) * h.scaling(m)  # sent at the model's scale s: the base adds s·(sent)
            torch.testing.assert_close(F, best, rtol=0, atol=1e-5 * float(S[0]))
            W0, W1 = rec["before"][m].to(F64), rec["after"][m].to(F64)
            want = W0 + (W0 * F if adapter == "hira" else F)
            atol = 1e-6 * float(want.abs().max())
            torch.testing.assert_close(W1, want, rtol=0, atol=atol)
            assert float((W1 - W0).abs().max()) > 100 * atol  # the fold moved the base, far above the tolerance
            down += min(D * K, p * (D + K))
            # Every client and the server restart from the round's fresh LoRA at their own rank: B = 0, the fresh A.
            for cid, view in rec["views"].items():
                r_u = sim.peers[cid].rank if cid >= 0 else h.rank
                assert torch.count_nonzero(view[k.B]) == 0 and view[k.A].shape[0] == r_u
                assert torch.equal(view[k.A], fresh[k.A][:r_u])
        assert metrics["divergence"] <= math.sqrt(1 - tau) + 1e-5
        up = sum(F32 * (MODULES * sim.peers[c].rank * (D + K) + HEAD) for c in metrics["clients"])
        assert metrics["bytes_up"] == up and metrics["bytes_down"] == U * F32 * (down + HEAD)
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    flower = run_federation(InlineGrid(cfg, fresh=True), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, sim.history)
    assert [m["florist_rank_per_layer"] for m in flower] == [m["florist_rank_per_layer"] for m in sim.history]


def test_a_resumed_run_ends_with_the_uninterrupted_metrics_and_the_export_reproduces_it(small_csv, tmp_path):
    from fedlora.app.experiment import run_experiment
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask

    cfg = tiny_config(small_csv, method="florist", client_ranks="2,4", rounds=3, fraction=0.67)
    reference = build(cfg).simulator.run()
    resume_matches(cfg, tmp_path, ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "florist_rank_per_layer"), reference)

    for adapter in ("lora", "hira"):
        out = tmp_path / f"run-{adapter}"
        exp, history = run_experiment(tiny_config(small_csv, method="florist", adapter=adapter, out=str(out)))
        assert exp.simulator.handle.folded  # something was folded, so the export carries a base delta
        model, _, _ = load_global_model(out)
        acc = ClassificationTask().evaluate(model, exp.simulator.global_test)
        assert acc == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)
