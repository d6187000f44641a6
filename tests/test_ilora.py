"""ILoRA (METHODS.md, wave 3): the QR init and QR truncation on random factors against dense float64 truths (the
d×k matrices are formed here, never in the library): nested truncations, no training ⇒ G' = G, ρ_qr ≥ ρ_svd;
bytes by hand; on the tiny model the round-1 model is W0 for every client rank, 2 rounds × 3 clients with mixed
ranks in-process and on the Flower app's in-process round with equal metrics, a resumed run, the export."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import resume_matches, tiny_config
from fedlora.aggregation import aggregate, comm_elements
from fedlora.aggregation.ilora import qr_positive, qr_truncate, relative_error, stacked, svd_truncate
from fedlora.app.experiment import build
from fedlora.federation import REGISTRY, make_method

F64 = torch.float64
D = K = 32  # tiny BERT: 4 adapted 32×32 matrices, a 3-class head of 3·32 + 3 floats, float32
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dense_qr_truncation(M, r):
    """The definition, densely: Q_r from M's first r columns (diag R ≥ 0), then Q_r Q_rᵀ M."""
    Q, R = torch.linalg.qr(M[:, :r])
    Q = Q * torch.sign(torch.diagonal(R))
    return Q, Q @ (Q.T @ M)


# ---- the math ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(4, 12), k=st.integers(4, 12), n=st.integers(1, 9), seed=st.integers(0, 10_000), data=st.data())
def test_qr_truncation_in_factor_space_is_the_dense_definition_and_nested(d, k, n, seed, data):
    r = data.draw(st.integers(1, min(d, k)))
    L, R_f = rand(d, n, seed=seed), rand(n, k, seed=seed + 1)
    M = L @ R_f
    Q, A = qr_truncate(L, R_f, r)
    Qd, Gd = dense_qr_truncation(M, r)
    if n >= r:  # M's first r columns of full rank: Q is unique
        torch.testing.assert_close(Q, Qd, atol=1e-9, rtol=0)
        torch.testing.assert_close(Q @ A, Gd, atol=1e-9, rtol=0)
        # nested: the rank-ρ truncation is (Q[:, :ρ], A[:ρ]), and it keeps M's first ρ columns exactly
        for rho in range(1, r + 1):
            torch.testing.assert_close(Q[:, :rho] @ A[:rho], dense_qr_truncation(M, rho)[1], atol=1e-9, rtol=0)
            torch.testing.assert_close((Q[:, :rho] @ A[:rho])[:, :rho], M[:, :rho], atol=1e-9, rtol=0)
    torch.testing.assert_close(Q.T @ Q, torch.eye(r, dtype=F64), atol=1e-9, rtol=0)
    # ρ_qr ≥ ρ_svd: the QR truncation is never better than the best rank-r fit (Eckart–Young)
    U, S = svd_truncate(L, R_f, r)
    assert relative_error(L, R_f, Q, A) >= relative_error(L, R_f, U, S) - 1e-9
    Uf, Sf, Vh = torch.linalg.svd(M)
    torch.testing.assert_close(U @ S, (Uf[:, :r] * Sf[:r]) @ Vh[:r], atol=1e-8, rtol=0)


def test_qr_init_has_a_nonnegative_diagonal_and_T_u_keeps_W0s_first_columns():
    W = rand(9, 7, seed=3)
    Q, R = qr_positive(W)
    assert bool((torch.diagonal(R) >= 0).all()) and torch.allclose(Q @ R, W)
    for r in range(1, 8):
        Qr, Rr = qr_truncate(W, torch.eye(7, dtype=F64), r)
        torch.testing.assert_close(Qr, Q[:, :r], atol=1e-10, rtol=0)
        torch.testing.assert_close(Rr, R[:r], atol=1e-10, rtol=0)
        torch.testing.assert_close((Qr @ Rr)[:, :r], W[:, :r], atol=1e-10, rtol=0)  # T_u[:, :r_u] = W0[:, :r_u]


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 4, 3]])
def test_without_training_the_global_content_is_unchanged(ranks):
    d, k, r, s = 10, 8, max(ranks), 2.0
    Q, A = qr_truncate(rand(d, k, seed=1), torch.eye(k, dtype=F64), r)  # G in QR form
    G = Q @ A
    scales = [s * r / ru for ru in ranks]
    starts = [(Q[:, :ru], A[:ru] / su) for ru, su in zip(ranks, scales)]  # what each client received
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    agg = aggregate("ilora", [b for b, _ in starts], [a for _, a in starts], w, scales=scales, current=(Q, A),
                    starts=[(b * su, a) for (b, a), su in zip(starts, scales)], rank=r)
    torch.testing.assert_close(agg.B @ agg.A, G, atol=1e-10, rtol=0)
    torch.testing.assert_close(agg.B, Q, atol=1e-10, rtol=0)
    # The paper's literal Σ w_u s_u B_u A_u (no G, no T_u) moves the content when the ranks differ.
    literal = aggregate("ilora", [b for b, _ in starts], [a for _, a in starts], w, scales=scales, rank=r)
    assert (torch.linalg.norm(literal.B @ literal.A - G) > 1e-3) == (len(set(ranks)) > 1)


def test_the_rule_is_the_qr_truncation_of_G_plus_the_weighted_deltas():
    d, k, r = 11, 9, 3
    G = rand(d, r, seed=4), rand(r, k, seed=5)
    Bs, As = [rand(d, 2, seed=6), rand(d, 3, seed=7)], [rand(2, k, seed=8), rand(3, k, seed=9)]
    starts = [(rand(d, 2, seed=10), rand(2, k, seed=11)), (rand(d, 3, seed=12), rand(3, k, seed=13))]
    w = torch.tensor([0.6, 0.4], dtype=F64)
    M = G[0] @ G[1] + sum(float(c) * (B @ A - T[0] @ T[1]) for c, B, A, T in zip(w, Bs, As, starts))
    agg = aggregate("ilora", Bs, As, w, current=G, starts=starts, rank=r)
    torch.testing.assert_close(agg.B @ agg.A, dense_qr_truncation(M, r)[1], atol=1e-9, rtol=0)
    L, R_f = stacked(G, Bs, As, w, starts)
    torch.testing.assert_close(L @ R_f, M, atol=1e-10, rtol=0)
    svd = aggregate("ilora", Bs, As, w, current=G, starts=starts, rank=r, truncate="svd")
    Uf, Sf, Vh = torch.linalg.svd(M)
    torch.testing.assert_close(svd.B @ svd.A, (Uf[:, :r] * Sf[:r]) @ Vh[:r], atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="ILoRA truncation 'lu' is not one of qr, svd; pass qr or svd"):
        aggregate("ilora", Bs, As, w, truncate="lu")


@pytest.mark.parametrize("d,k,r", [(40, 30, 4), (64, 48, 8)])
def test_bytes_by_hand(d, k, r):
    assert comm_elements("ilora", d, k, r, 3) == (r * d + r * k, r * d + r * k)  # B_u, A_u up; Q_r[:, :r_u], (QᵀM)[:r_u] down


def test_traits_options_and_refusals_in_one_line():
    cls = REGISTRY["ilora"]
    assert cls.adapters() == ("lora", "rslora") and cls.mixed_ranks and not cls.exact and not cls.linear
    assert cls.server_opt == "" and "new QR basis every round" in cls.server_opt_refusal
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"method ilora does not support adapter {adapter}: .*choose lora or rslora"):
            make_method("ilora", adapter)
    with pytest.raises(ValueError, match="option ilora-truncate='lu' of method ilora is not one of qr, svd"):
        make_method("ilora", truncate="lu")
    assert make_method("ilora").settings["cv"] == "scaffold"  # METHODS.md's default
    with pytest.raises(ValueError, match="option ilora-cv='saga' of method ilora is not one of scaffold, off"):
        make_method("ilora", cv="saga")


# ---- the protocol on the tiny model --------------------------------------------------------------------------


def logits(sim, batch):
    sim.model.eval()
    with torch.no_grad():
        return sim.model(**batch).logits.double()


@pytest.mark.parametrize("adapter,ranks", [("lora", ""), ("lora", "2,4,3"), ("rslora", "1,4")])
def test_round_one_model_is_W0_for_every_client_rank(small_csv, adapter, ranks):
    cfg = tiny_config(small_csv, method="ilora", adapter=adapter, client_ranks=ranks)
    sim = build(cfg).simulator
    h = sim.handle
    batch = sim.global_test.batch(torch.arange(16), "cpu")
    pristine = build(cfg.replace(method="fedit")).simulator
    with pristine.model.disable_adapter():
        w0 = logits(pristine, batch)
    W0 = {m: h.base_layout(m, layer.get_base_layer().weight).double() for m, layer in pristine.handle.layers.items()}
    for m, layer in h.layers.items():  # the base holds W0 − T_r: the offset is there
        base = h.base_layout(m, layer.get_base_layer().weight).double()
        assert float((base - W0[m]).abs().max()) > 0.1 * float(W0[m].abs().max())
    for peer in sim.peers + [sim.server]:
        start = sim.held[peer.cid] if peer.cid >= 0 else sim.global_tensors
        h.set(start, rank=peer.rank, scale=peer.scale)
        torch.testing.assert_close(logits(sim, batch), w0, atol=1e-6, rtol=0)
        for m, k in h.keys.items():  # B = Q[:, :r_u] orthonormal, A = R[:r_u]/s_u; the layer computes W0 x
            B = start[k.B].double()
            torch.testing.assert_close(B.T @ B, torch.eye(peer.rank, dtype=F64), atol=1e-5, rtol=0)
            x = torch.randn(5, K, dtype=torch.float32)
            with torch.no_grad():
                y = h.layers[m](x).double()
            bias = h.layers[m].get_base_layer().bias
            want = x.double() @ W0[m].T + (0 if bias is None else bias.double())
            torch.testing.assert_close(y, want, atol=2e-5, rtol=0)
    assert sim.handle.folded  # the build fold W0 − T_r is counted: the export adds it back


def run_recording(sim):
    rounds = []
    original = sim.method.aggregate

    def spy(h_, ups, weights, current, ctx):
        update = original(h_, ups, weights, current, ctx)
        rounds.append(dict(uploads=ups, weights=weights, update=update, peers=ctx.peers, current=current))
        return update

    sim.method.aggregate = spy
    sim.run()
    del sim.method.aggregate
    return rounds


@pytest.mark.parametrize("adapter,ranks,cv", [("lora", "2,4,3", "scaffold"), ("rslora", "", "off")])
def test_two_rounds_three_clients_in_process_and_on_flower(small_csv, tmp_path, adapter, ranks, cv):
    cfg = tiny_config(small_csv, method="ilora", adapter=adapter, client_ranks=ranks, method_options=f"ilora-cv={cv}")
    sim = build(cfg).simulator
    h = sim.handle
    s = h.spec.scale_at(h.rank)
    rounds = run_recording(sim)
    for rec, metrics in zip(rounds, sim.history):
        for k in h.keys.values():
            cur = rec["current"]
            M = s * cur[k.B].double() @ cur[k.A].double()
            for c, u, p in zip(rec["weights"], rec["uploads"], rec["peers"]):
                start_B = cur[k.B][:, :p.rank].double()
                start_A = cur[k.A][:p.rank].double() * s / p.scale
                M = M + float(c) * p.scale * (u[k.B].double() @ u[k.A].double() - start_B @ start_A)
            new = rec["update"].broadcast
            G1 = s * new[k.B].double() @ new[k.A].double()
            torch.testing.assert_close(G1, dense_qr_truncation(M, h.rank)[1], atol=2e-5, rtol=0)
            for p in sim.peers if rec is rounds[-1] else []:  # each client holds the nested truncation at its rank and scale
                view = sim.held[p.cid]
                got = p.scale * view[k.B].double() @ view[k.A].double()
                torch.testing.assert_close(got, dense_qr_truncation(M, p.rank)[1], atol=2e-5, rtol=0)
        twice = 2 if cv == "scaffold" else 1  # the control variates: Δc_u up, c[:r_u] down, r_u(d+k) per matrix each
        up = sum(F32 * (twice * MODULES * sim.peers[c].rank * (D + K) + HEAD) for c in metrics["clients"])
        down = sum(F32 * (twice * MODULES * p.rank * (D + K) + HEAD) for p in sim.peers)
        assert metrics["bytes_up"] == up and metrics["bytes_down"] == down
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    flower = run_federation(InlineGrid(cfg, fresh=True), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, sim.history)


def test_svd_truncation_is_one_rank_only(small_csv):
    sim = build(tiny_config(small_csv, method="ilora", method_options="ilora-truncate=svd", rounds=1)).simulator
    assert sim.run()[0]["divergence"] is not None
    mixed = build(tiny_config(small_csv, method="ilora", method_options="ilora-truncate=svd", client_ranks="2,4", rounds=1)).simulator
    with pytest.raises(ValueError, match="ilora-truncate=svd needs one rank for all clients"):
        mixed.round(1)


def test_a_resumed_run_ends_with_the_uninterrupted_metrics_and_the_export_reproduces_it(small_csv, tmp_path):
    from fedlora.app.experiment import run_experiment
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask

    cfg = tiny_config(small_csv, method="ilora", client_ranks="2,4", rounds=3, fraction=0.67)
    reference = build(cfg).simulator.run()
    resume_matches(cfg, tmp_path, ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "train_loss"), reference)

    out = tmp_path / "run"
    exp, history = run_experiment(tiny_config(small_csv, method="ilora", client_ranks="2,4", out=str(out)))
    model, _, _ = load_global_model(out)
    acc = ClassificationTask().evaluate(model, exp.simulator.global_test)
    assert acc == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)
