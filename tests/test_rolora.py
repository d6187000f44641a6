"""RoLoRA (METHODS.md): alternating B- and A-rounds, each exact, each sending only the factor it trained."""


import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.aggregation import aggregate, comm_bytes, divergence
from fedlora.app.experiment import build
from fedlora.federation.simulator import client_weights

F64 = torch.float64
# Non-square matrices, so that dr ≠ rk: value is 32×32, intermediate.dense 64×32 (d = 64 out, k = 32 in).
TARGETS = "value,intermediate.dense"
R, HEAD, F32 = 4, 3 * 32 + 3, 4
SHAPES = [(32, 32), (64, 32), (32, 32), (64, 32)]  # (d, k) of the four adapted matrices (2 layers)

pytestmark = pytest.mark.usefixtures("one_thread")


def uploads(U=4, r=3, d=20, k=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
    As = [torch.randn(r, k, generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.1
    return Bs, As, w / w.sum()


def test_each_round_averages_the_trained_factor_and_is_exact():
    Bs, As, w = uploads()
    ideal = lambda Bs, As: sum(float(c) * B @ A for c, B, A in zip(w, Bs, As))  # noqa: E731
    shared_A = [As[0].clone() for _ in As]
    res = aggregate("rolora", Bs, shared_A, w)  # a B-round by default
    torch.testing.assert_close(res.B, sum(float(c) * B for c, B in zip(w, Bs)), rtol=0, atol=1e-14)
    assert torch.equal(res.A, As[0]) and res.frozen_A and not res.frozen_B
    assert float((res.delta() - ideal(Bs, shared_A)).abs().max()) < 1e-10
    assert divergence(Bs, shared_A, w, res) < 1e-10

    shared_B = [Bs[0].clone() for _ in Bs]
    res = aggregate("rolora", shared_B, As, w, trained="A")
    torch.testing.assert_close(res.A, sum(float(c) * A for c, A in zip(w, As)), rtol=0, atol=1e-14)
    assert torch.equal(res.B, Bs[0]) and res.frozen_B and not res.frozen_A
    assert float((res.delta() - ideal(shared_B, As)).abs().max()) < 1e-10
    assert divergence(shared_B, As, w, res) < 1e-10


def test_bytes_are_dr_in_B_rounds_and_rk_in_A_rounds():
    d, k, r, U = 4096, 1024, 16, 10
    assert comm_bytes("rolora", d, k, r, U) == comm_bytes("rolora", d, k, r, U, trained="B")
    assert comm_bytes("rolora", d, k, r, U, trained="B").up == comm_bytes("rolora", d, k, r, U, trained="B").down == d * r * 4
    assert comm_bytes("rolora", d, k, r, U, trained="A").up == comm_bytes("rolora", d, k, r, U, trained="A").down == r * k * 4
    Bs, As, w = uploads(U=3, r=2, d=12, k=7)
    for trained, frozen in (("B", "A"), ("A", "B")):
        B_in = [Bs[0]] * 3 if frozen == "B" else Bs
        A_in = [As[0]] * 3 if frozen == "A" else As
        res = aggregate("rolora", B_in, A_in, w, trained=trained)
        assert res.down_bytes() == comm_bytes("rolora", 12, 7, 2, 3, F64, trained=trained).down


def test_a_frozen_factor_that_differs_or_a_bad_round_kind_is_refused():
    Bs, As, w = uploads()
    with pytest.raises(ValueError, match=r"client 1's A for 'q' differs from client 0's .*RoLoRA freezes it"):
        aggregate("rolora", Bs, As, w, name="q")
    with pytest.raises(ValueError, match=r"client 1's B differs from client 0's"):
        aggregate("rolora", Bs, As, w, trained="A")
    with pytest.raises(ValueError, match=r"RoLoRA's trained factor is 'AB'; pass trained='B' .* or trained='A'"):
        aggregate("rolora", Bs, [As[0]] * len(As), w, trained="AB")


def hand_count(rnd: int, U: int = 3) -> tuple[int, int]:
    """Bytes up and down of a round: the trained factor of every matrix plus the head, per client, each way."""
    per = sum(d * R if rnd % 2 else R * k for d, k in SHAPES) + HEAD
    return U * per * F32, U * per * F32


def trace_training(monkeypatch, h):
    """Record, per client turn, the trainables the client started from and what it held after training."""
    import fedlora.federation.simulator as simulator

    turns, original = [], simulator.train_local

    def spy(*args, **kwargs):
        before = h.get()
        loss = original(*args, **kwargs)
        turns.append((before, h.get()))
        return loss

    monkeypatch.setattr(simulator, "train_local", spy)
    return turns


def trace_broadcasts(sim):
    """Record what the server broadcasts each round (the method's aggregate, wrapped on this instance)."""
    sent, original = [], sim.method.aggregate

    def spy(*args, **kwargs):
        update = original(*args, **kwargs)
        sent.append(update.broadcast)
        return update

    sim.method.aggregate = spy
    return sent


def test_two_rounds_alternate_start_from_the_global_factors_and_match_flower(small_csv, tmp_path, monkeypatch):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="rolora", target_modules=TARGETS, rank=R)
    sim = build(cfg).simulator
    h = sim.handle
    assert sim.method.frozen(h, 1) == h.A_names() and sim.method.frozen(h, 2) == h.B_names()
    turns, sent = trace_training(monkeypatch, h), trace_broadcasts(sim)
    w = client_weights([len(c.train) for c in sim.clients], "examples")
    states = [h.get()]  # the global trainables before round 1, after round 1, after round 2
    history = []
    for rnd in (1, 2):
        history.append(sim.round(rnd))
        states.append(dict(sim.global_tensors))
    assert len(turns) == 6
    trained_names, frozen_names = h.B_names(), h.A_names()
    for rnd in (1, 2):
        start, end, rows = states[rnd - 1], states[rnd], turns[3 * (rnd - 1): 3 * rnd]
        for before, after in rows:  # every client starts from the global state: nothing chained from the previous client
            assert all(torch.equal(before[n], start[n]) for n in start)
            assert all(torch.equal(after[n], start[n]) for n in frozen_names)  # the frozen factor never moved
            assert all(not torch.equal(after[n], start[n]) for n in trained_names)
        for n in trained_names:  # the server's new factor is the weighted mean of what the clients trained
            torch.testing.assert_close(end[n].to(F64), sum(float(c) * a[n].to(F64) for c, (_, a) in zip(w, rows)), rtol=1e-6, atol=1e-7)
        for n in frozen_names:
            assert torch.equal(end[n], start[n])
        for k in h.keys.values():  # exact: the new product is the mean of the clients' products
            ideal = sum(float(c) * a[k.B].to(F64) @ a[k.A].to(F64) for c, (_, a) in zip(w, rows))
            torch.testing.assert_close(end[k.B].to(F64) @ end[k.A].to(F64), ideal, rtol=1e-5, atol=1e-7)
        # the broadcast carries the new trained factor and the averaged head, nothing of the frozen factor
        assert set(sent[rnd - 1]) == set(trained_names) | set(h.other_names)
        trained_names, frozen_names = frozen_names, trained_names

    for m in history:
        assert (m["bytes_up"], m["bytes_down"]) == hand_count(m["round"])
        assert set(m["divergence_per_layer"]) == set(h.layers)
        assert m["divergence"] < 1e-5 and m["n_rejected"] == 0
    assert hand_count(1) != hand_count(2)  # dr ≠ rk here: a wrong factor in either round would show

    reference = build(cfg).simulator.run()
    assert [m["divergence"] for m in reference] == [m["divergence"] for m in history]
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, reference)


def test_partial_sampling_on_flower_and_a_resumed_run_keep_the_round_parity(small_csv, tmp_path):
    """A client that missed rounds applies a B-broadcast and an A-broadcast in turn; a run resumed after round 1
    goes on with an A-round."""
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="rolora", target_modules=TARGETS, rank=R, rounds=3, fraction=0.67)
    reference = build(cfg).simulator.run()
    for m in reference:
        U = len(m["clients"])
        # catch-up broadcasts to clients that missed a round are counted on top of the hand count
        assert (m["bytes_up"], m["bytes_down"] - m["catch_up_bytes"]) == hand_count(m["round"], U) and m["divergence"] < 1e-5
    grid = InlineGrid(cfg, fresh=True)
    assert_same_history(run_federation(grid, cfg.replace(out=str(tmp_path / "flower"))), reference)
    assert any(len(m.content.config_records["config"]["broadcast-rounds"]) > 1 for m in grid.sent if m.metadata.message_type == "train")

    resume_matches(cfg, tmp_path, ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy"), reference)
