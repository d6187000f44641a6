"""FedSVD (METHODS.md): B trained against a frozen A; the server re-factors B̄A by its SVD, exactly, without d×k."""


import pytest
import torch

from conftest import tiny_config
from fedlora.aggregation import CommBytes, aggregate, comm_bytes, divergence
from fedlora.aggregation.fedsvd import svd_refactor
from fedlora.app.experiment import build
from fedlora.federation import make_method
from fedlora.federation.simulator import client_weights
from test_aggregation import LargestAllocation
from test_rolora import TARGETS, trace_broadcasts, trace_training

F64 = torch.float64
R, HEAD, F32 = 4, 3 * 32 + 3, 4
SHAPES = [(32, 32), (64, 32), (32, 32), (64, 32)]  # (d, k) of the adapted matrices with TARGETS (2 layers)

pytestmark = pytest.mark.usefixtures("one_thread")


def uploads(U=5, r=4, d=37, k=23, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, k, generator=g, dtype=F64) * 3  # far from orthonormal, as round 1's seeded init
    Bs = [torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.1
    return [B.to(dtype) for B in Bs], [A.to(dtype).clone() for _ in range(U)], w / w.sum()


@pytest.mark.parametrize("shape", [(5, 4, 37, 23), (3, 8, 16, 64), (1, 2, 64, 9), (4, 6, 3, 10)])
def test_the_new_factors_keep_the_product_and_A_has_orthonormal_rows(shape):
    U, r, d, k = shape
    Bs, As, w = uploads(U, r, d, k, seed=sum(shape))
    res = aggregate("fedsvd", Bs, As, w)
    B_bar = sum(float(c) * B for c, B in zip(w, Bs))
    assert res.B.shape == (d, r) and res.A.shape == (r, k)
    assert float((res.B @ res.A - B_bar @ As[0]).abs().max()) < 1e-10 * float(B_bar.abs().max() * As[0].abs().max())
    assert float((res.A @ res.A.T - torch.eye(r, dtype=F64)).abs().max()) < 1e-10
    assert divergence(Bs, As, w, res) < 1e-10
    # B = U_r S_r: orthogonal columns whose norms are the singular values of B̄A, largest first
    s = torch.linalg.svdvals(B_bar @ As[0])[:r]
    G = res.B.T @ res.B
    torch.testing.assert_close(G, torch.diag(torch.nn.functional.pad(s, (0, r - len(s))) ** 2), rtol=0, atol=1e-9 * float(s[0]) ** 2)
    torch.testing.assert_close(res.info["singular_values"][: len(s)], s, rtol=1e-10, atol=1e-12)


def test_all_B_zero_still_sends_an_orthonormal_A_and_float32_stays_float32():
    Bs, As, w = uploads()
    res = aggregate("fedsvd", [torch.zeros_like(B) for B in Bs], As, w)
    assert torch.count_nonzero(res.B) == 0
    assert float((res.A @ res.A.T - torch.eye(4, dtype=F64)).abs().max()) < 1e-12
    Bs, As, w = uploads(dtype=torch.float32)
    res = aggregate("fedsvd", Bs, As, w)
    assert res.B.dtype == res.A.dtype == torch.float32
    assert divergence(Bs, As, w, res) < 1e-6
    assert float((res.A @ res.A.T - torch.eye(4)).abs().max()) < 1e-6


def test_only_B_goes_up_and_both_factors_come_down():
    d, k, r, U = 4096, 1024, 16, 10
    assert comm_bytes("fedsvd", d, k, r, U) == CommBytes(up=d * r * 4, down=r * (d + k) * 4)
    Bs, As, w = uploads(U=3, r=2, d=12, k=7, dtype=torch.float32)
    assert aggregate("fedsvd", Bs, As, w).down_bytes() == comm_bytes("fedsvd", 12, 7, 2, 3).down


def test_the_svd_never_forms_a_d_by_k_matrix():
    U, r, d, k = 4, 4, 640, 512
    Bs, As, w = uploads(U, r, d, k, seed=3)
    with LargestAllocation() as rec:
        aggregate("fedsvd", Bs, As, w)
    assert rec.numel <= max(d, k) * r, f"allocated {rec.shape} in {rec.op}"
    with LargestAllocation() as rec:  # the recorder does see a d×k product
        svd_refactor(Bs[0], As[0])[0] @ As[0]
    assert rec.shape == (d, k)


def test_different_As_too_large_a_rank_and_vera_are_refused():
    Bs, As, w = uploads()
    As[2] = As[2] + 1e-3
    with pytest.raises(ValueError, match=r"client 2's A for 'q' differs from client 0's .*FedSVD freezes A at the one the server sent"):
        aggregate("fedsvd", Bs, As, w, name="q")
    Bs, As, w = uploads(r=6, k=5)
    with pytest.raises(ValueError, match=r"A is 6×5: FedSVD's new A has r orthonormal rows of length k, which needs r ≤ k"):
        aggregate("fedsvd", Bs, As, w)
    with pytest.raises(ValueError, match="method fedsvd does not support adapter vera: VeRA's A is its frozen shared random projection"):
        make_method("fedsvd", "vera")


def hand_count(U: int = 3) -> tuple[int, int]:
    """Bytes per round: B of every matrix (and the head) up; both re-factored factors (and the head) down."""
    up = sum(d * R for d, _ in SHAPES) + HEAD
    down = sum(R * (d + k) for d, k in SHAPES) + HEAD
    return U * up * F32, U * down * F32


def test_two_rounds_train_B_against_the_broadcast_A_and_match_flower(small_csv, tmp_path, monkeypatch):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="fedsvd", target_modules=TARGETS, rank=R)
    sim = build(cfg).simulator
    h = sim.handle
    turns, sent = trace_training(monkeypatch, h), trace_broadcasts(sim)
    w = client_weights([len(c.train) for c in sim.clients], "examples")
    states, history = [h.get()], []
    for rnd in (1, 2):
        history.append(sim.round(rnd))
        states.append(dict(sim.global_tensors))
    for rnd in (1, 2):
        start, end, rows = states[rnd - 1], states[rnd], turns[3 * (rnd - 1): 3 * rnd]
        for before, after in rows:
            assert all(torch.equal(before[n], start[n]) for n in start)  # every client starts from the global state
            assert all(torch.equal(after[n], start[n]) for n in h.A_names())  # and keeps the A it received frozen
            assert all(not torch.equal(after[n], start[n]) for n in h.B_names())
        for k in h.keys.values():
            B_bar = sum(float(c) * a[k.B].to(F64) for c, (_, a) in zip(w, rows))
            A_new = end[k.A].to(F64)
            torch.testing.assert_close(end[k.B].to(F64) @ A_new, B_bar @ start[k.A].to(F64), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(A_new @ A_new.T, torch.eye(R, dtype=F64), rtol=0, atol=1e-6)
        assert set(sent[rnd - 1]) == set(h.trainable_names)  # both factors and the head come down
    assert not torch.equal(states[1][h.A_names()[0]], states[0][h.A_names()[0]])  # round 1 replaced the seeded A
    for m in history:
        assert (m["bytes_up"], m["bytes_down"]) == hand_count()
        assert set(m["divergence_per_layer"]) == set(h.layers)
        assert m["divergence"] < 1e-5 and m["n_rejected"] == 0

    reference = build(cfg).simulator.run()
    flower = run_federation(InlineGrid(cfg, fresh=True), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, reference)
