"""Server optimisers (--server-opt; METHODS.md "Server optimisers"): Algorithm 2 against a hand computation, avgm
with η = 1, β = 0 equal to the method itself, FFA's avgm equal to full-parameter FedAvgM on ΔW, untrained tensors
and rank segments not stepped, folds stepped dense, refusals in one line, the state in the checkpoint, and the
Flower round equal to the simulator's."""

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from fedlora.aggregation import ServerOptRule
from fedlora.app.experiment import build, load_checkpoint, save_checkpoint
from fedlora.cli.main import main
from fedlora.federation import REGISTRY, Method, Peer, RoundContext, ServerUpdate
from fedlora.federation.server_opt import ServerOptConfig, ServerOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the rule on random tensors ---------------------------------------------------------------------------------
def _algorithm_2(kind, xs_bar, x0, lr, b1, b2, tau):
    """Reddi et al., Alg. 2, written in its own terms: Δ_t = x̄_t − x_t, m_t = β1 m + (1−β1)Δ_t, v_t per rule,
    x_{t+1} = x_t + η m_t / (√v_t + τ), m_0 = 0, v_0 = τ², no bias correction; elementwise loops."""
    x, m, v = x0.tolist(), [0.0] * x0.numel(), [tau**2] * x0.numel()
    out = []
    for bar in xs_bar:
        bar = bar.tolist()
        for i in range(len(x)):
            d = bar[i] - x[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            if kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            elif kind == "yogi":
                s = (v[i] > d * d) - (v[i] < d * d)
                v[i] = v[i] - (1 - b2) * d * d * s
            else:
                v[i] = v[i] + d * d
            x[i] = x[i] + lr * m[i] / (v[i] ** 0.5 + tau)
        out.append(torch.tensor(x, dtype=torch.float64))
    return out


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_rules_follow_algorithm_2_by_hand(kind):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(12, dtype=torch.float64, generator=gen)
    # x̄_t as a method would produce from x_t: x_t plus a random update (some tiny, so sign(v − g²) flips for yogi).
    steps = [torch.randn(12, dtype=torch.float64, generator=gen) * 10.0 ** float(torch.randint(-4, 1, (1,), generator=gen)) for _ in range(4)]
    rule = ServerOptRule(kind, lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    x, state, bars, got = x0, None, [], []
    for s in steps:
        bars.append(x + s)
        x, state = rule.step(x, bars[-1], state)
        got.append(x)
    # The hand loop, fed the same x̄_t, must reproduce every iterate (so the x̄_t it is fed are its own x_t + s_t).
    want = _algorithm_2(kind, bars, x0, 0.05, 0.8, 0.95, 1e-2)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(got, want, strict=True))

def test_avgm_is_flowers_fedavgm_and_avg_is_the_method():
    gen = torch.Generator().manual_seed(1)
    x, m = torch.randn(5, 3, dtype=torch.float64, generator=gen), None
    rule, state = ServerOptRule("avgm", lr=0.7, momentum=0.6), None
    for t in range(3):
        bar = x + torch.randn(5, 3, dtype=torch.float64, generator=gen)
        g = x - bar
        m = g if t == 0 else 0.6 * m + g  # fedavgm.py: the first round's momentum is the pseudo-gradient
        new, state = rule.step(x, bar, state)
        assert torch.allclose(new, x - 0.7 * m, atol=1e-12)
        x = new
    bar = torch.randn(5, 3, generator=gen)
    assert ServerOptRule("avg").step(x.float(), bar, None)[0] is bar
    same, _ = ServerOptRule("avgm", lr=1.0, momentum=0.0).step(torch.randn(5, 3, generator=gen), bar, {"m": torch.randn(5, 3, generator=gen)})
    assert torch.equal(same, bar)  # bit for bit, whatever the state


# ---- which tensors are stepped -------------------------------------------------------------------------------------
def _handle(rank=4):
    return SimpleNamespace(trainable_set=frozenset({"B", "A", "head"}), rank_dim={"B": 1, "A": 0}, rank=rank)


def test_rank_segments_nobody_trained_keep_the_method_result_and_their_state():
    gen = torch.Generator().manual_seed(0)
    h, method = _handle(), REGISTRY["hetlora"]()
    opt = ServerOptimizer(ServerOptConfig("avgm", lr=0.5, momentum=0.9), method)
    cur = {"B": torch.randn(6, 4, generator=gen), "A": torch.randn(4, 5, generator=gen), "head": torch.randn(3, generator=gen)}
    bar = {k: v + torch.randn(v.shape, generator=gen) for k, v in cur.items()}
    low = RoundContext(1, 0, [Peer(0, 2, 1.0), Peer(1, 2, 1.0)], mixed=True)
    new = opt.step(h, ServerUpdate(broadcast=bar), cur, low).broadcast
    assert torch.equal(new["B"][:, 2:], bar["B"][:, 2:]) and torch.equal(new["A"][2:], bar["A"][2:])
    assert torch.allclose(new["B"][:, :2], cur["B"][:, :2] - 0.5 * (cur["B"] - bar["B"])[:, :2])
    assert torch.allclose(new["head"], cur["head"] - 0.5 * (cur["head"] - bar["head"]))
    assert opt.moments["B"]["m"][:, 2:].abs().sum() == 0 and opt.moments["A"]["m"][2:].abs().sum() == 0
    m_low = opt.moments["B"]["m"][:, :2].clone()
    full = RoundContext(2, 0, [Peer(0, 2, 1.0), Peer(1, 4, 1.0)], mixed=True)
    bar2 = {k: v + torch.randn(v.shape, generator=gen) for k, v in new.items()}
    opt.step(h, ServerUpdate(broadcast=bar2), new, full)
    g = new["B"] - bar2["B"]
    assert torch.allclose(opt.moments["B"]["m"][:, :2], 0.9 * m_low + g[:, :2]) and torch.allclose(opt.moments["B"]["m"][:, 2:], g[:, 2:])


def test_a_fold_is_stepped_dense_as_the_bases_pseudo_gradient(caplog):
    gen = torch.Generator().manual_seed(2)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        opt = ServerOptimizer(ServerOptConfig("avgm", lr=0.7, momentum=0.5), REGISTRY["flora"]())
    assert "dense fold" in caplog.text and len(caplog.records) == 1
    h, m = _handle(), None
    for t in range(2):
        L, R = torch.randn(6, 8, generator=gen), torch.randn(8, 5, generator=gen)
        head = torch.randn(3, generator=gen)
        update = ServerUpdate(broadcast={"q.fold_L": L, "q.fold_R": R, "head": head})
        out = opt.step(h, update, {"head": head.clone()}, RoundContext(t + 1, 0, [Peer(0, 4, 1.0)])).broadcast
        assert set(out) == {"q.fold", "head"}
        F = L @ R
        m = -F if m is None else 0.5 * m - F  # g = x_t − x̄ = −F on the base
        assert torch.allclose(out["q.fold"], -0.7 * m, atol=1e-5)
    assert opt.moments["q.fold"]["m"].shape == (6, 5)


def test_every_method_declares_whether_a_server_optimiser_applies():
    """A new method file must say it: ``server_opt`` (factors or fold) or a refusal reason of its own."""
    for name, cls in REGISTRY.items():
        declared = [c for c in cls.__mro__ if c is not Method and ("server_opt" in vars(c) or "server_opt_refusal" in vars(c))]
        assert declared, f"{name} declares neither server_opt nor server_opt_refusal"
        assert cls.server_opt in ("factors", "fold", ""), name


# ---- in a run ------------------------------------------------------------------------------------------------------
KEYS = ("clients", "divergence", "bound", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")


@pytest.mark.parametrize("method", ["fedit", "fedsa", "flora"])
def test_avgm_with_eta_1_and_beta_0_is_the_method_itself(small_csv, method):
    plain = build(tiny_config(small_csv, method=method)).simulator.run()
    cfg = tiny_config(small_csv, method=method, server_opt="avgm", server_lr=1.0, server_momentum=0.0)
    stepped = build(cfg).simulator.run()
    for a, b in zip(plain, stepped):
        for key in KEYS:
            if method == "flora" and key == "bytes_down":
                assert b[key] > a[key]  # the stepped fold goes down dense
            else:
                assert a[key] == b[key], (method, a["round"], key)


def test_ffa_avgm_is_full_parameter_fedavgm_on_delta_w(small_csv):
    """(B_{t+1} − B_t)A0 = −ηM_t, M_t = βM_{t−1} + (B_t − B̄_t)A0: FedAvgM on ΔW itself, A0 never moves."""
    eta, beta = 0.8, 0.6
    sim = build(tiny_config(small_csv, method="ffa", rounds=3, server_opt="avgm", server_lr=eta, server_momentum=beta)).simulator
    seen, aggregate = [], sim.method.aggregate
    sim.method.aggregate = lambda *a, **k: seen.append(aggregate(*a, **k)) or seen[-1]
    keys = sim.handle.keys
    A0 = {m: sim.global_tensors[k.A].clone() for m, k in keys.items()}
    M = {m: 0.0 for m in keys}
    for rnd in (1, 2, 3):
        before = {m: sim.global_tensors[k.B].clone() for m, k in keys.items()}
        sim.round(rnd)
        for m, k in keys.items():
            A = A0[m].double()
            M[m] = beta * M[m] + (before[m].double() - seen[-1].broadcast[k.B].double()) @ A
            moved = (sim.global_tensors[k.B].double() - before[m].double()) @ A
            assert torch.allclose(moved, -eta * M[m], atol=1e-6), (rnd, m)
            assert torch.equal(sim.global_tensors[k.A], A0[m])
    assert not any(k.A in sim.server_opt.moments for k in keys.values())


def test_rolora_frozen_factor_is_neither_stepped_nor_its_state_touched(small_csv):
    sim = build(tiny_config(small_csv, method="rolora", rounds=2, server_opt="adam")).simulator
    h, method = sim.handle, sim.method
    frozen1 = method.frozen(h, 1)
    before = {n: sim.global_tensors[n].clone() for n in frozen1}
    sim.round(1)
    assert all(torch.equal(sim.global_tensors[n], before[n]) for n in frozen1)
    assert not set(frozen1) & set(sim.server_opt.moments) and sim.server_opt.moments
    trained1 = {n: {k: t.clone() for k, t in s.items()} for n, s in sim.server_opt.moments.items() if n not in h.other_names}
    sim.round(2)  # round 2 trains the other factor: round 1's factor is frozen now and keeps its state
    assert set(frozen1) <= set(sim.server_opt.moments)
    for n, state in trained1.items():
        assert all(torch.equal(sim.server_opt.moments[n][k], t) for k, t in state.items()), n


def test_fslora_steps_every_component_its_sketches_did_not_cover(small_csv):
    """FSLoRA's zeros outside a client's sketch are its estimator: the optimiser steps all r components, not only the
    first max k_u (the mixed-rank rule for the other methods)."""
    sim = build(tiny_config(small_csv, method="fslora", rank=8, client_ranks="2,2,2", rounds=1, server_opt="avgm",
                            server_lr=0.5, server_momentum=0.0)).simulator
    seen, aggregate = [], sim.method.aggregate
    sim.method.aggregate = lambda *a, **k: seen.append(aggregate(*a, **k)) or seen[-1]
    before = dict(sim.global_tensors)
    sim.round(1)
    for k in sim.handle.keys.values():  # x ← x − η(x − x̄) on every component, beyond the sketch size 2 too
        want = before[k.B] - 0.5 * (before[k.B] - seen[-1].broadcast[k.B])
        assert torch.allclose(sim.global_tensors[k.B], want, atol=1e-6) and sim.server_opt.moments[k.B]["m"][:, 2:].abs().sum() > 0


def test_fedhello_blocks_nobody_trained_are_not_stepped(small_csv):
    """A block no client of the round was allocated keeps its factors and its state under momentum, also when an
    earlier round trained it (stepping it with g = 0 would move it by ηβm)."""
    sim = build(tiny_config(small_csv, method="fedhello", method_options="fedhello-layers=1", clients=1, rounds=4,
                            server_opt="avgm", server_lr=1.0, server_momentum=0.9)).simulator
    h, method, carried = sim.handle, sim.method, 0
    for rnd in range(1, 5):
        idle = method.untrained(h, RoundContext(rnd, 0, [sim.peers[0]]))
        assert idle and len(idle) < 2 * len(h.keys)  # one block of the tiny model's two
        before = {n: sim.global_tensors[n].clone() for n in idle}
        moments = {n: {k: t.clone() for k, t in sim.server_opt.moments[n].items()} for n in idle if n in sim.server_opt.moments}
        carried += sum(bool(m["m"].abs().sum() > 0) for m in moments.values())
        sim.round(rnd)
        assert all(torch.equal(sim.global_tensors[n], before[n]) for n in idle), rnd
        assert all(torch.equal(sim.server_opt.moments[n][k], t) for n, m in moments.items() for k, t in m.items()), rnd
    assert carried  # some idle block had momentum from an earlier round: the case that matters


@pytest.mark.parametrize("kind", ["avgm", "adam"])
def test_three_rounds_equal_two_rounds_resume_and_one(small_csv, tmp_path, kind):
    cfg = tiny_config(small_csv, method="fedit", rounds=3, server_opt=kind)
    full = build(cfg).simulator
    reference = full.run()
    first = build(cfg).simulator
    first.round(1)
    first.round(2)
    save_checkpoint(first, tmp_path)
    tensors, meta = load_checkpoint(tmp_path)
    assert any(k.startswith("serveropt/m/") for k in tensors) and (kind != "adam" or any(k.startswith("serveropt/v/") for k in tensors))
    resumed = build(cfg).simulator
    resumed.restore(tensors, meta)
    history = resumed.run()
    assert [h[k] for h in history for k in KEYS] == [h[k] for h in reference for k in KEYS]
    assert all(torch.equal(resumed.global_tensors[n], t) for n, t in full.global_tensors.items())


@pytest.mark.parametrize("args,needle", [
    (["--method", "svd", "--server-opt", "adam"], "--server-opt adam cannot run with method svd because"),
    (["--method", "fedex", "--server-opt", "avgm"], "--server-opt avgm cannot run with method fedex because"),
    (["--method", "central", "--server-opt", "yogi"], "cannot run with method central"),
    (["--method", "fedit", "--server-opt", "sgd"], "unknown server optimiser 'sgd'"),
    (["--method", "fedit", "--server-opt", "adam", "--server-beta2", "1"], "server_beta2=1.0 is outside [0, 1)"),
])
def test_refusals_are_one_line_and_exit_code_2(args, needle, small_csv, tmp_path, capsys):
    code = main(["run", "--model", "tiny:bert", "--data", str(small_csv), "--quiet", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_a_flower_round_with_avgm_equals_the_simulator(small_csv, tmp_path):
    pytest.importorskip("flwr")
    from fedlora.app.experiment import run_experiment
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation
    from test_flower import assert_same_history

    cfg = tiny_config(small_csv, method="ffa", fraction=0.67, server_opt="avgm")
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    exp, reference = run_experiment(cfg.replace(out=str(tmp_path / "inprocess")))
    assert_same_history(flower, reference)
    plain = build(tiny_config(small_csv, method="ffa", fraction=0.67)).simulator
    plain.run()  # round 1's momentum is g (x̄ itself); round 2's step is where the optimiser shows
    assert any(not torch.equal(t, plain.global_tensors[n]) for n, t in exp.simulator.global_tensors.items())


def test_a_resumed_flower_run_continues_the_optimiser_state(small_csv, tmp_path):
    """The Flower ServerApp's checkpoint carries the optimiser's state: 2 rounds, a new ServerApp resumed, 1 round,
    ends with the uninterrupted 3-round run's numbers."""
    pytest.importorskip("flwr")
    from fedlora.flower import client_app
    from fedlora.flower.inline import InlineGrid
    from fedlora.flower.server_app import run_federation
    from test_flower import assert_same_history

    cfg = tiny_config(small_csv, method="fedit", rounds=3, server_opt="adam", server_lr=0.05)
    full = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "full")))
    out = tmp_path / "killed"
    run_federation(InlineGrid(cfg, state_dir=tmp_path / "nodes"), cfg.replace(rounds=2, out=str(out)))
    client_app._ProcessModel._loaded = None  # new processes
    resumed = run_federation(InlineGrid(cfg, state_dir=tmp_path / "nodes", fresh=True), cfg.replace(out=str(out)), resume=True)
    assert_same_history(resumed, full)
    (a, _), (b, _) = load_checkpoint(tmp_path / "full"), load_checkpoint(out)
    kept = [k for k in a if k.startswith(("global/", "serveropt/"))]
    assert any(k.startswith("serveropt/v/") for k in kept) and all(torch.equal(a[k], b[k]) for k in kept)
