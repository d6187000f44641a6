"""LoRA-A² (METHODS.md, wave 3): exactness with the frozen factor, top-score selection over all modules, the mask
reset after every optimizer step (weight decay included), the compact upload's bytes by hand, odd rounds train B,
budget r without probe effect = alternating FedIT (rolora), end to end, Flower, resume, export."""

import itertools
import math

import pytest
import torch

from conftest import flower_resume_and_export, tiny_config
from fedlora.aggregation import aggregate
from fedlora.aggregation.loraa2 import pack_mask, rank_scores, select_top, unpack_mask
from fedlora.app.experiment import build
from fedlora.federation import make_method
from fedlora.federation.methods.loraa2 import MASK, SELECTED

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
D = K = 32
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4
KEYS = ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("trained", ["B", "A"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_round_is_exact_with_the_frozen_factor(trained, seed):
    """B^{t+1}A − B^tA = Σ_u w_u (B_u − B^t)A for clients trained under random masks (A-rounds: the mirror), and the
    rule is B^t + Σ_u w_u ΔB_u ⊙ M_u with unselected entries as zero (client's drift there is ignored)."""
    d, k, r, U = 9, 7, 5, 3
    Bt, At = rand(d, r, seed=seed), rand(r, k, seed=seed + 10)
    w = torch.rand(U, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    w = w / w.sum()
    masks = [torch.rand(r, generator=torch.Generator().manual_seed(seed * 7 + u)) < 0.5 for u in range(U)]
    if trained == "B":
        Bs = [Bt + rand(d, r, seed=20 + u) * m[None, :] for u, m in enumerate(masks)]
        res = aggregate("loraa2", Bs, [At] * U, w, trained="B", masks=masks, start=Bt)
        torch.testing.assert_close(res.B @ At - Bt @ At, sum(wu * (Bu - Bt) @ At for wu, Bu in zip(w, Bs)))
        torch.testing.assert_close(res.A, At)
        drift = [B + rand(d, r, seed=40 + u) * (~m)[None, :] for u, (B, m) in enumerate(zip(Bs, masks))]
        torch.testing.assert_close(aggregate("loraa2", drift, [At] * U, w, trained="B", masks=masks, start=Bt).B, res.B)
    else:
        As = [At + rand(r, k, seed=20 + u) * m[:, None] for u, m in enumerate(masks)]
        res = aggregate("loraa2", [Bt] * U, As, w, trained="A", masks=masks, start=At)
        torch.testing.assert_close(Bt @ res.A - Bt @ At, sum(wu * Bt @ (Au - At) for wu, Au in zip(w, As)))
        torch.testing.assert_close(res.B, Bt)
    with pytest.raises(ValueError, match="differs from client 0's"):
        aggregate("loraa2", [Bt] * U, [At, At + 1, At], w, trained="B")


def test_selected_averaging_renormalises_per_rank_over_its_selectors():
    d, r = 6, 3
    Bt, At = rand(d, r, seed=1), rand(r, 4, seed=2)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    masks = [torch.tensor([True, False, False]), torch.tensor([True, True, False]), torch.tensor([False, True, False])]
    deltas = [rand(d, r, seed=5 + u) * m[None, :] for u, m in enumerate(masks)]
    res = aggregate("loraa2", [Bt + x for x in deltas], [At] * 3, w, masks=masks, start=Bt, average="selected")
    torch.testing.assert_close(res.B[:, 0], Bt[:, 0] + (0.5 * deltas[0][:, 0] + 0.3 * deltas[1][:, 0]) / 0.8)
    torch.testing.assert_close(res.B[:, 1], Bt[:, 1] + (0.3 * deltas[1][:, 1] + 0.2 * deltas[2][:, 1]) / 0.5)
    torch.testing.assert_close(res.B[:, 2], Bt[:, 2])  # nobody selected it
    plain = aggregate("loraa2", [Bt + x for x in deltas], [At] * 3, w, masks=masks, start=Bt)
    torch.testing.assert_close(plain.B[:, 0], Bt[:, 0] + 0.5 * deltas[0][:, 0] + 0.3 * deltas[1][:, 0])  # not renormalised


def test_the_selection_keeps_the_top_scores_over_all_modules():
    """Against brute force: of every (module, rank) subset of size b·N, the selection has the largest total score;
    scores are ‖ΔB_i A_i‖_F (‖B_i ΔA_i‖_F); a module may get 0 or all r."""
    r, N = 4, 3
    dB = [rand(5, r, seed=m) * torch.tensor([3.0, 0.1, 2.0, 0.5], dtype=F64) * (m + 1) for m in range(N)]
    A = [rand(r, 6, seed=10 + m) for m in range(N)]
    scores = [rank_scores(x, a, "B") for x, a in zip(dB, A)]
    for m in range(N):
        for i in range(r):
            assert float(scores[m][i]) == pytest.approx(float(torch.linalg.norm(dB[m][:, i:i + 1] @ A[m][i:i + 1])))
    dA = rand(r, 6, seed=3)
    torch.testing.assert_close(rank_scores(dA, dB[0], "A"), torch.stack([torch.linalg.norm(dB[0][:, i:i + 1] @ dA[i:i + 1]) for i in range(r)]))
    flat = torch.cat(scores)
    for count in range(0, N * r + 1):
        keep = torch.cat(select_top(scores, count))
        assert int(keep.sum()) == count
        best = max(sum(float(flat[j]) for j in c) for c in itertools.combinations(range(N * r), count))
        assert float(flat[keep].sum()) == pytest.approx(best)
    uneven = select_top([torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], 2)
    assert uneven[0].tolist() == [False, False] and uneven[1].tolist() == [True, True]
    with pytest.raises(ValueError, match="pass a budget from 1 to the rank"):
        select_top(scores, N * r + 1)


def test_the_mask_packs_into_n_r_bits_and_round_trips():
    masks = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_mask(masks)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(15 / 8)
    assert torch.equal(unpack_mask(packed, 5, 3), masks)
    with pytest.raises(ValueError, match="must be 2 bytes"):
        unpack_mask(packed.to(torch.int32), 5, 3)
    bad = packed.clone()
    bad[-1] |= 0x80
    with pytest.raises(ValueError, match="beyond its N·r entries"):
        unpack_mask(bad, 5, 3)


def test_after_step_resets_unselected_columns_bit_identically_under_weight_decay(small_csv):
    """Unselected columns of B stay bit-identical to the start through AdamW steps with weight decay (which alone
    would move them); selected ones move; A (frozen in a B-round) does not."""
    sim = build(tiny_config(small_csv, method="loraa2", rank=4)).simulator
    h, method, peer = sim.handle, sim.method, sim.peers[0]
    h.set(sim.held[0], rank=peer.rank, scale=peer.scale)
    torch.manual_seed(0)
    for n in h.B_names():  # a non-zero start, so that weight decay alone would move it
        h.parameter(n).data.normal_()
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, 1, peer=peer), False)
    start = h.get()
    masks = {m: torch.tensor([i == j % 4 for i in range(4)]) for j, m in enumerate(h.keys)}
    names = {m: k.B for m, k in h.keys.items()}
    method._round[peer.cid] = (1, {n: start[n] for n in names.values()}, masks)
    params = [p for p in h.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    batch = sim.clients[0].train.batch(torch.arange(8), "cpu")
    for _ in range(3):
        sim.task.loss(h.model, batch).backward()
        opt.step()
        method.after_step(h, peer, 1)
        opt.zero_grad()
    now = h.get()
    for m, n in names.items():
        off, on = ~masks[m], masks[m]
        assert torch.equal(now[n][:, off], start[n][:, off])
        assert not torch.equal(now[n][:, on], start[n][:, on])
        assert torch.equal(now[h.keys[m].A], start[h.keys[m].A])


def test_budgets_options_and_refusals(small_csv, capsys):
    cfg = tiny_config(small_csv, method="loraa2", rank=8, client_ranks="1,2,3")
    assert cfg.ranks() is None and cfg.adapter_spec().r == 8  # every client holds the global rank-8 adapter
    method = cfg.method_object()
    sim = build(cfg).simulator
    assert [method.budget(8, p) for p in sim.peers] == [1, 2, 3]
    assert make_method("loraa2").budget(8) == 2 and make_method("loraa2").budget(5) == 2  # ⌈r/4⌉
    assert make_method("loraa2", budget=3).budget(8) == 3
    with pytest.raises(ValueError, match="upload budgets in ranks per module, but 9 exceeds the rank 8"):
        tiny_config(small_csv, method="loraa2", rank=8, client_ranks="2,9").validate()
    from fedlora.cli.main import main

    code = main(["run", "--method", "loraa2", "--rank", "4", "--client-ranks", "2,5", "--model", "tiny:bert", "--data", str(small_csv),
                 "--quiet", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "upload budgets in ranks per module, but 5 exceeds the rank 4" in err
    with pytest.raises(ValueError, match="loraa2-lr-ratio=0.0 must be positive"):
        make_method("loraa2", lr_ratio=0)
    for adapter in ("dora", "vera"):
        with pytest.raises(ValueError, match=f"does not support adapter {adapter}"):
            make_method("loraa2", adapter)
    tiny_config(small_csv, method="loraa2", secure_aggregation=True).validate()  # the dense upload (secure_upload)
    with pytest.raises(ValueError, match="loraa2 needs each client's factors"):
        tiny_config(small_csv, method="loraa2", dp="client", dp_noise=1.0).validate()
    m = make_method("loraa2", lr_ratio=5)
    assert m.trained(1) == "B" and m.trained(2) == "A" and m.trained(3) == "B"  # Algorithm 1: odd rounds train B


def test_bytes_by_hand_and_what_clients_send(small_csv):
    """Up: b_u selected columns of ΔB (d floats each) per module on average, plus ⌈N·r/8⌉ mask bytes, plus the head;
    A-rounds rows of ΔA (k each). Down: the trained factor and the head. Budgets 1, 2, 3 at r = 4."""
    cfg = tiny_config(small_csv, method="loraa2", rank=4, client_ranks="1,2,3")
    sim = build(cfg).simulator
    sent = []
    inner = sim.turn

    def spy(*args):
        out = inner(*args)
        sent.append(out.upload)
        return out

    sim.turn = spy
    history = sim.run()
    mask_bytes = math.ceil(MODULES * 4 / 8)
    for h, dim in zip(history, (D, K)):
        up = sum(F32 * (b * MODULES * dim + HEAD) + mask_bytes for b in (1, 2, 3))
        down = 3 * F32 * (MODULES * 4 * dim + HEAD)
        assert (h["bytes_up"], h["bytes_down"]) == (up, down) and not h["rejected"]
        assert h["divergence"] < 1e-5  # exact
    for u, upload in enumerate(sent[:3]):
        masks = unpack_mask(upload[MASK], MODULES, 4)
        assert int(masks.sum()) == (u + 1) * MODULES
        assert all(upload[n].shape == (D, int(c)) for n, c in zip((k.B + SELECTED for k in sim.handle.keys.values()), masks.sum(1)) if c)
    assert history[0]["bytes_up"] < history[0]["bytes_down"]  # the budget saves upload


def test_round_one_trains_B_and_a_bad_upload_is_rejected(small_csv):
    sim = build(tiny_config(small_csv, method="loraa2", rank=4, rounds=1)).simulator
    h = sim.handle
    before = dict(sim.global_tensors)
    sim.run()
    after = sim.global_tensors
    assert all(torch.equal(after[n], before[n]) for n in h.A_names())
    assert any(not torch.equal(after[n], before[n]) for n in h.B_names())
    upload = {n: t for n, t in sim.method.upload(h, sim.held[0], 1).items()}
    upload[MASK] = pack_mask(torch.ones(MODULES, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="over its budget of 4"):
        sim.method.receive(h, upload, sim.held[0], 1, sim.peers[0])


def test_budget_r_without_probe_effect_is_rolora(small_csv):
    """Budget = r keeps every component (the mask resets nothing) and the probe is discarded: with the lr ratio 1
    the run is RoLoRA's alternating FedIT, tensor for tensor."""
    ref = build(tiny_config(small_csv, method="rolora", rounds=3)).simulator
    ref_history = ref.run()
    sim = build(tiny_config(small_csv, method="loraa2", rounds=3, method_options="loraa2-budget=4,loraa2-lr-ratio=1")).simulator
    history = sim.run()
    for a, b in zip(history, ref_history):
        assert a["global_accuracy"] == b["global_accuracy"] and a["train_loss"] == b["train_loss"]
    for n, t in ref.global_tensors.items():
        torch.testing.assert_close(sim.global_tensors[n], t, rtol=1e-6, atol=1e-7)


def test_flower_in_process_round_resume_and_export(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="loraa2", client_ranks="1,2", rounds=3, fraction=0.67)
    flower_resume_and_export(cfg, tmp_path, KEYS)


@pytest.mark.parametrize("average", ["all", "selected"])
def test_the_secure_sum_of_dense_uploads_gives_the_plain_aggregate(small_csv, average):
    """Each client's dense secure upload (start + ΔB ⊙ M and its mask as floats), summed with the round's weights, gives
    through the rule the aggregate of the compact uploads (B- and A-rounds, budgets 1, 2, 3, both averages)."""
    from fedlora.federation.protocol import RoundContext

    cfg = tiny_config(small_csv, method="loraa2", rank=4, client_ranks="1,2,3", method_options=f"loraa2-average={average}")
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    seen, sent, starts = [], {}, {}
    inner, inner_turn = method.aggregate, sim.turn

    def spy(h_, ups, weights, current, ctx):
        update = inner(h_, ups, weights, current, ctx)
        seen.append((weights, dict(current), ctx, update))
        return update

    def turn(h_, method_, task, client, start, cfg_, rnd):
        out = inner_turn(h_, method_, task, client, start, cfg_, rnd)
        sent[(rnd, client.cid)], starts[(rnd, client.cid)] = out.upload, start
        return out

    method.aggregate, sim.turn = spy, turn
    sim.run()
    for rnd, (weights, current, ctx, update) in enumerate(seen, start=1):
        dense = [method.secure_upload(h, sent[(rnd, p.cid)], starts[(rnd, p.cid)], rnd, p) for p in ctx.peers]
        layout = method.secure_upload(h, method.upload(h, current, rnd), None, rnd)
        assert {n: (t.shape, t.dtype) for n, t in dense[0].items()} == {n: (t.shape, t.dtype) for n, t in layout.items()}
        mean = {n: sum(float(w) * u[n].double() for w, u in zip(weights, dense)).to(layout[n].dtype) for n in layout}
        secure = inner(h, [mean], torch.ones(1, dtype=F64), current, RoundContext(rnd, ctx.seed, ctx.peers[:1]))
        assert set(secure.broadcast) == set(update.broadcast)
        for n, t in update.broadcast.items():
            torch.testing.assert_close(secure.broadcast[n], t, rtol=1e-5, atol=1e-6)
        trained = h.B_names() if rnd == 1 else h.A_names()
        assert any(not torch.equal(update.broadcast[n], current[n]) for n in trained)


def test_flower_secure_aggregation_bytes_are_the_dense_upload(small_csv, tmp_path):
    """Under SecAgg+ every client's masked vector holds its weight and the dense upload, counted by hand: the trained
    factor (N·d·r, A-rounds N·r·k), the head and the N×r mask; the run follows the plain Flower run."""
    pytest.importorskip("flwr")
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid

    cfg = tiny_config(small_csv, method="loraa2", rank=4, clients=3, rounds=2)
    plain = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "plain")))
    seen = []

    class Recording(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            seen.append(list(replies))
            return replies

    history = run_federation(Recording(cfg), cfg.replace(secure_aggregation=True, out=str(tmp_path / "secure")))
    masked = [[sum(bytes_to_ndarray(b).size for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
               for r in batch] for batch in seen
              if any(RECORD_KEY_CONFIGS in r.content.config_records and Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]
                     for r in batch)]
    assert len(masked) == 2
    for counts, dim in zip(masked, (D, K)):
        dense = MODULES * 4 * dim + HEAD + MODULES * 4
        assert counts == [1 + dense] * 3  # the weight, then the dense upload
    for s, p in zip(history, plain):
        assert s["secure_aggregation"] is True and s["clients"] == p["clients"] and s["n_rejected"] == 0
        assert s["bytes_up"] > 3 * 4 * (1 + MODULES * 4 * D + HEAD + MODULES * 4)  # at least the masked vectors
        assert s["global_accuracy"] == pytest.approx(p["global_accuracy"], abs=0.1)
