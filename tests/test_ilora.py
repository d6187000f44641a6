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


# ---- client control variates (--ilora-cv scaffold) -------------------------------------------------------------


def test_the_corrected_step_by_hand_on_one_tensor_two_steps():
    """``x ← x − η(m̂/(√v̂+ε) + c − c_u)`` with torch's AdamW (λ = 0) and the simulator's ``corrected`` hook, against
    AdamW written out; then ``c_u⁺ = c_u − c + (x_start − x_end)/(Kη)`` is the mean of the uncorrected steps."""
    from fedlora.aggregation.ilora import client_variate
    from fedlora.federation.simulator import FederationConfig, corrected, local_optimizer

    lr, eps, b1, b2 = 0.01, 1e-8, 0.9, 0.999
    x0 = rand(3, 2, seed=20)
    c, c_u = rand(3, 2, seed=21), rand(3, 2, seed=22)
    target = rand(3, 2, seed=23)
    x = torch.nn.Parameter(x0.clone())
    opt = local_optimizer([x], FederationConfig(lr=lr))
    hook = corrected({"x": x}, {"x": c - c_u}, {"x": lr}, lambda: None)
    grads = []
    for _ in range(2):  # loss ½‖x ∘ x − target‖² (a curved one: the two steps' gradients differ)
        loss = 0.5 * ((x * x - target) ** 2).sum()
        loss.backward()
        grads.append(x.grad.detach().clone())
        opt.step()
        hook()
        opt.zero_grad(set_to_none=True)
    # by hand: the same two gradients, AdamW's bias-corrected moments, the correction added to each step
    y, m, v, steps = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        steps.append(u)
        y = y - lr * (u + c - c_u)
    torch.testing.assert_close(x.detach(), y, atol=1e-12, rtol=0)
    new = client_variate(c_u, c, x0, x.detach(), 2, lr)
    torch.testing.assert_close(new, (steps[0] + steps[1]) / 2, atol=1e-9, rtol=0)


def test_server_variate_by_hand_with_mixed_ranks_pads_each_rank_segment():
    from fedlora.aggregation.ilora import server_variate

    r, N = 4, 5  # N: the run's clients, of whom three were sampled
    cB, cA = rand(6, r, seed=30), rand(r, 7, seed=31)
    dB = [rand(6, 2, seed=32), rand(6, 4, seed=33), rand(6, 3, seed=34)]
    dA = [rand(2, 7, seed=35), rand(4, 7, seed=36), rand(3, 7, seed=37)]
    B = server_variate(cB, dB, N, dim=1)
    A = server_variate(cA, dA, N, dim=0)
    for j in range(r):  # component j gets the deltas of the clients whose rank covers it, over N
        want_B = cB[:, j] + sum(d[:, j] for d in dB if d.shape[1] > j) / N
        want_A = cA[j] + sum(d[j] for d in dA if d.shape[0] > j) / N
        torch.testing.assert_close(B[:, j], want_B, atol=1e-12, rtol=0)
        torch.testing.assert_close(A[j], want_A, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="needs the run's number of clients"):
        server_variate(cB, dB, 0, dim=1)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(3, 9), rho=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_rebasing_is_a_change_of_coordinates_where_the_spans_agree_and_a_projection_otherwise(d, rho, seed):
    from fedlora.aggregation.ilora import rebase

    rho = min(rho, d)
    B_old, _ = torch.linalg.qr(rand(d, rho, seed=seed))
    O, _ = torch.linalg.qr(rand(rho, rho, seed=seed + 1))
    B_new = B_old @ O  # the same span, new coordinates
    A_old, cB, cA = rand(rho, 5, seed=seed + 2), rand(d, rho, seed=seed + 3), rand(rho, 5, seed=seed + 4)
    nB, nA = rebase(cB, cA, B_new, B_old)
    A_new = B_new.T @ B_old @ A_old  # the factors move by the same P: the product is kept
    torch.testing.assert_close(B_new @ A_new, B_old @ A_old, atol=1e-10, rtol=0)
    # the direction the variates give the product, δB·A + B·δA, is the same in either basis
    torch.testing.assert_close(nB @ A_new + B_new @ nA, cB @ A_old + B_old @ cA, atol=1e-10, rtol=0)
    if rho < d:  # a span orthogonal to the old one: nothing of an A-variate survives
        other = torch.linalg.qr(torch.cat([B_old, rand(d, d, seed=seed + 5)], 1))[0][:, rho:rho + min(rho, d - rho)]
        assert float(rebase(cB[:, :other.shape[1]], cA[:other.shape[1]], other, B_old[:, :other.shape[1]])[1].abs().max()) < 1e-10


def test_first_round_of_scaffold_is_plain_adamw_and_off_is_unchanged(small_csv):
    """With c = c_u = 0 (round 1) the corrected steps are AdamW's: the round's global model and metrics equal
    ``--ilora-cv off``'s but for the bytes of the variates; from round 2 on they differ."""
    runs = {}
    for cv in ("off", "scaffold"):
        sim = build(tiny_config(small_csv, method="ilora", client_ranks="2,4,3", method_options=f"ilora-cv={cv}")).simulator
        runs[cv] = sim, [sim.round(1)]
        runs[cv][1].append(dict(sim.global_tensors))
        runs[cv][1].append(sim.round(2))
    (off, (m_off, g_off, r2_off)), (on, (m_on, g_on, r2_on)) = runs["off"], runs["scaffold"]
    for key in ("divergence", "train_loss", "global_accuracy", "local_accuracy"):
        assert m_off[key] == m_on[key], key
    assert g_off.keys() == g_on.keys() and all(torch.equal(g_off[n], g_on[n]) for n in g_off)
    assert m_on["bytes_up"] > m_off["bytes_up"] and r2_off["train_loss"] != r2_on["train_loss"]
    assert on.private and all(n.startswith("state:") for p in on.private.values() for n in p)
    assert not off.private and not off.method.server_state()


def test_the_server_variate_and_each_clients_segment_in_a_run_by_hand(small_csv):
    """Two rounds, mixed ranks, a sampled subset: the server's c is ``rebase(c + (1/N) Σ pad(Δc_u), B', B)``; each
    client holds ``c[:r_u]`` in its view and keeps c_u with the B it started from; bytes = the declaration."""
    from fedlora.aggregation.ilora import rebase
    from fedlora.federation.methods.ilora import BASIS, CU, DC, C

    cfg = tiny_config(small_csv, method="ilora", client_ranks="2,4,3", fraction=0.67, rounds=2)
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    rounds, c = run_recording(sim), {}
    for rec, metrics in zip(rounds, sim.history):
        new = rec["update"].broadcast
        for k in h.keys.values():
            cur = rec["current"]
            mid = {}
            for n in (k.B, k.A):
                dim = h.rank_dim[n]
                total = c.get(n, torch.zeros_like(cur[n])).double()
                for u in rec["uploads"]:
                    d = u[DC + n].double()
                    total = total + torch.nn.functional.pad(d, (0, h.rank - d.shape[1]) if dim == 1 else (0, 0, 0, h.rank - d.shape[0])) / 3
                mid[n] = total
            c[k.B], c[k.A] = rebase(mid[k.B], mid[k.A], new[k.B].double(), cur[k.B].double())
            torch.testing.assert_close(new[C + k.B].double(), c[k.B], atol=1e-5, rtol=0)
            torch.testing.assert_close(new[C + k.A].double(), c[k.A], atol=1e-5, rtol=0)
        side = [method.side_bytes(h, metrics["round"], sim.peers[cid]) for cid in metrics["clients"]]
        assert sum(s[0] for s in side) == sum(F32 * MODULES * sim.peers[cid].rank * (D + K) for cid in metrics["clients"])
    for p in sim.peers:  # each client's view holds its segment of the last c; private: c_u and the B it started from
        for k in h.keys.values():
            torch.testing.assert_close(sim.held[p.cid][C + k.A].double(), c[k.A][:p.rank], atol=1e-5, rtol=0)
            if p.cid in sim.private:
                priv = sim.private[p.cid]
                assert priv[CU + k.B].shape == (D, p.rank) and priv[BASIS + k.B].shape == (D, p.rank)
    assert set(method.server_state()) == {f"c/{n}" for k in h.keys.values() for n in (k.B, k.A)}


def test_a_clients_own_model_loads_without_its_method_state(small_csv):
    """The view and private state hold the variates (method state); loading client u's model takes its factors only."""
    from fedlora.app.export import set_model

    exp = build(tiny_config(small_csv, method="ilora", client_ranks="2,4", rounds=1))
    exp.simulator.run()
    assert any(n.startswith("state:") for n in exp.simulator.held[0]) and exp.simulator.private
    for cid in (0, 1):
        assert set_model(exp, cid) == f"client {cid}"
        rank = exp.simulator.peers[cid].rank
        for n, t in exp.simulator.handle.get(rank=rank).items():
            assert torch.equal(t, exp.simulator.held[cid][n]), n
