"""Fed-HeLLo (METHODS.md, wave 3): each client trains the LoRA of the blocks allocated to it this round; each block
is averaged over the clients that trained it; blocks are read from module names exactly (never by substring)."""

from types import SimpleNamespace

import pytest
import torch

from conftest import flower_resume_and_export, tiny_config
from fedlora.adapters.handle import ModuleKeys
from fedlora.aggregation import aggregate
from fedlora.aggregation.fedhello import BOTTLENECK, allocate, block_of, layer_probabilities
from fedlora.app.experiment import build
from fedlora.federation import Peer, make_method

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
D = K = 32
R = 4
HEAD = 3 * 32 + 3
MODULES = 4
F32 = 4
KEYS = ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")


def test_blocks_are_parsed_exactly_from_module_names():
    assert block_of("bert.encoder.layer.1.attention.self.query") == 1
    assert block_of("bert.encoder.layer.10.attention.self.query") == 10
    assert block_of("transformer.h.11.attn.c_attn") == 11
    assert block_of("model.layers.5.self_attn.q_proj") == 5
    assert block_of("classifier.dense") is None


def test_freezing_block_1_does_not_freeze_blocks_10_and_11():
    """The official code's trap: ``str(nd) in n`` freezes 10 and 11 with 1."""
    method = make_method("fedhello")
    modules = [f"bert.encoder.layer.{b}.attention.self.{m}" for b in range(12) for m in ("query", "value")]
    method.blocks = {m: block_of(m) for m in modules}
    h = SimpleNamespace(keys={m: ModuleKeys(B=f"{m}.B", A=f"{m}.A") for m in modules})
    method.allocated = lambda rnd, cid, start=None: {10, 11}  # client trains blocks 10 and 11 only
    frozen = set(method.frozen(h, 1, peer=Peer(0, R, 1.0)))
    for m in modules:
        assert (f"{m}.B" in frozen) == (block_of(m) not in (10, 11)), m
    method.allocated = lambda rnd, cid, start=None: {1}  # block 1 trains; 10 and 11 (names containing "1") stay frozen
    frozen = set(method.frozen(h, 1, peer=Peer(0, R, 1.0)))
    for m in modules:
        assert (f"{m}.A" in frozen) == (block_of(m) != 1), m
    assert method.frozen(h, 1) == []  # no client: nothing frozen (the server's model)


def test_layer_probabilities_follow_the_patterns():
    torch.testing.assert_close(layer_probabilities(12, "bottleneck"), torch.tensor(BOTTLENECK, dtype=F64) / 27)
    torch.testing.assert_close(layer_probabilities(6, "bottleneck"), torch.tensor([3, 3, 2, 1, 3, 3], dtype=F64) / 15)  # nearest index
    torch.testing.assert_close(layer_probabilities(4, "uniform"), torch.full((4,), 0.25, dtype=F64))
    torch.testing.assert_close(layer_probabilities(4, "triangle"), torch.tensor([1, 2, 3, 4], dtype=F64) / 10)
    torch.testing.assert_close(layer_probabilities(4, "inverted"), torch.tensor([4, 3, 2, 1], dtype=F64) / 10)
    with pytest.raises(ValueError, match="Fed-HeLLo pattern 'fim' has no fixed probabilities"):
        layer_probabilities(4, "fim")


def test_allocation_is_seeded_distinct_and_drawn_with_the_probabilities():
    blocks = list(range(6))
    p = layer_probabilities(6, "triangle")
    got = allocate(blocks, 3, p, 7, 2, 1)
    assert got == sorted(set(got)) and len(got) == 3 and got == allocate(blocks, 3, p, 7, 2, 1)
    assert allocate(blocks, 9, p, 7, 2, 1) == blocks
    counts = torch.zeros(6, dtype=F64)
    n = 3000
    for rnd in range(n):
        counts[allocate(blocks, 1, p, 0, rnd, 0)[0]] += 1
    assert torch.allclose(counts / n, p, atol=0.03)
    assert len({tuple(allocate(blocks, 2, p, 0, 1, c)) for c in range(10)}) > 1  # per client


def test_the_rule_averages_over_the_trainers_only():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(8, 3, generator=g, dtype=F64) for _ in range(3)]
    As = [torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3)]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    one = aggregate("fedhello", Bs, As, w, trained=[False, True, False])
    torch.testing.assert_close(one.B, Bs[1])  # one trainer: its factors
    torch.testing.assert_close(one.A, As[1])
    two = aggregate("fedhello", Bs, As, w, trained=[True, False, True])
    torch.testing.assert_close(two.B, (0.5 * Bs[0] + 0.2 * Bs[2]) / 0.7)  # renormalised over the trainers
    fedit = aggregate("fedit", Bs, As, w)
    torch.testing.assert_close(aggregate("fedhello", Bs, As, w).B, fedit.B)
    with pytest.raises(ValueError, match="no client with weight trained this block"):
        aggregate("fedhello", Bs, As, w, trained=[False] * 3)


def spy_on(sim):
    seen = []
    inner = sim.method.aggregate

    def spy(h, uploads, weights, current, ctx):
        update = inner(h, uploads, weights, current, ctx)
        seen.append((ctx, uploads, weights, current, update))
        return update

    sim.method.aggregate = spy
    return seen


def test_a_run_trains_sends_and_averages_only_the_allocated_blocks(small_csv):
    sim = build(tiny_config(small_csv, method="fedhello", method_options="fedhello-layers=1")).simulator
    h, method = sim.handle, sim.method
    assert sorted(set(method.blocks.values())) == [0, 1]
    seen = spy_on(sim)
    history = sim.run()
    for (ctx, uploads, weights, current, update), m in zip(seen, history):
        up = down = 0
        for peer, upload in zip(ctx.peers, uploads):
            blocks = method.allocated(ctx.number, peer.cid)
            assert len(blocks) == 1
            for module, k in h.keys.items():
                trained = block_of(module) in blocks
                assert (k.B in upload, k.A in upload) == (trained, trained)
                if trained:
                    up += R * (D + K)
                down += R * (D + K)
            up, down = up + HEAD, down + HEAD
        assert (m["bytes_up"], m["bytes_down"]) == (F32 * up, F32 * down)
        assert set(m["divergence_per_layer"]) == set(h.layers)
        cids = [p.cid for p in ctx.peers]
        for module, k in h.keys.items():
            who = [i for i, p in enumerate(ctx.peers) if block_of(module) in method.allocated(ctx.number, p.cid)]
            if not who:  # nobody trained the block: unchanged
                assert torch.equal(update.broadcast[k.B], current[k.B])
                continue
            w = weights[who] / weights[who].sum()
            expect = sum(float(wu) * uploads[i][k.B] for wu, i in zip(w, who))
            torch.testing.assert_close(update.broadcast[k.B], expect)
        assert cids == [0, 1, 2]


def test_every_client_training_every_block_is_fedit(small_csv):
    ref = build(tiny_config(small_csv, method="fedit")).simulator
    ref_history = ref.run()
    sim = build(tiny_config(small_csv, method="fedhello", method_options="fedhello-layers=2")).simulator
    history = sim.run()
    for a, b in zip(history, ref_history):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=0.02)
    for n, t in ref.global_tensors.items():
        torch.testing.assert_close(sim.global_tensors[n], t, rtol=1e-4, atol=1e-5)


def test_flower_in_process_round_resume_and_export(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="fedhello", method_options="fedhello-layers=1,2,1", rounds=3, fraction=0.67)
    flower_resume_and_export(cfg, tmp_path, KEYS)


def test_refusals_are_one_line(small_csv):
    with pytest.raises(ValueError, match="does not support adapter dora"):
        make_method("fedhello", "dora")
    with pytest.raises(ValueError, match="fedhello-layers='0,2' is not a list of block counts"):
        make_method("fedhello", layers="0,2")
    with pytest.raises(ValueError, match="option fedhello-pattern='fisher' of method fedhello is not one of"):
        make_method("fedhello", pattern="fisher")
    with pytest.raises(ValueError, match=r"option fedhello-fim-every=0 of method fedhello must be in \[1, inf\)"):
        make_method("fedhello", pattern="fim", fim_every=0)
    from fedlora.federation import parse_method_options

    assert parse_method_options("fedhello", "fedhello-layers=6,9,12,fedhello-pattern=uniform") == {"layers": "6,9,12", "pattern": "uniform"}
    with pytest.raises(ValueError, match="cannot train clients of different ranks"):
        tiny_config(small_csv, method="fedhello", client_ranks="2,4").validate()
    with pytest.raises(ValueError, match="secure aggregation: method fedhello needs each client's factors"):
        tiny_config(small_csv, method="fedhello", secure_aggregation=True).validate()


# ---- FIM-HLA (--fedhello-pattern fim) --------------------------------------------------------------------------


def test_kmeans_levels_are_sorted_by_centre_and_seeded():
    from fedlora.aggregation.fedhello import fim_probabilities, kmeans_1d

    x = torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=F64)
    for seed in range(20):
        levels, centres = kmeans_1d(x, 3, seed)
        assert bool((centres[1:] > centres[:-1]).all())  # level 0 the lowest centre
        for j in range(3):  # each level's centre is its members' mean, and the levels do not interleave
            torch.testing.assert_close(centres[j], x[levels == j].mean())
        assert all(float(x[levels == j].max()) < float(x[levels == j + 1].min()) for j in range(2))
        again = kmeans_1d(x, 3, seed)[0]
        assert torch.equal(levels, again)  # same seed, same allocation
        torch.testing.assert_close(fim_probabilities(x, seed), torch.tensor([1.0, 2.0, 3.0], dtype=F64)[levels] / (levels + 1).sum())
    # three clear groups: the highest scores get weight 3 whatever the seed (never an unsorted label)
    groups = torch.tensor([10.0, 0.1, 5.0, 0.12, 10.3, 5.2], dtype=F64)
    for seed in range(10):
        torch.testing.assert_close(fim_probabilities(groups, seed), torch.tensor([3, 1, 2, 1, 3, 2], dtype=F64) / 12)


def test_fisher_scores_by_hand_on_the_tiny_model(small_csv):
    """F_l = Σ over block l's factors of ‖mean per-example squared gradient‖_F on the client's 32 seeded examples:
    per-example gradients here by ``backward`` one example at a time, against the method's probe."""
    from fedlora.aggregation.fedhello import _seed
    from fedlora.federation.methods.fedhello import FIM_EXAMPLES, SCORES
    from fedlora.federation.simulator import peer_of

    sim = build(tiny_config(small_csv, method="fedhello", method_options="fedhello-pattern=fim,fedhello-fim-every=1,fedhello-layers=1",
                            examples_per_client=40)).simulator
    h, method, client = sim.handle, sim.method, sim.clients[1]
    peer = peer_of(h, client, method)
    h.set(sim.held[1], rank=peer.rank, scale=peer.scale)
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, 1, peer=peer, start=sim.held[1]), False)  # the probe scores frozen blocks too
    flags = {n: h.parameter(n).requires_grad for n in h.trainable_names}
    got = method.probe(h, peer, 1, sim.task, client.train, sim.config)[SCORES]
    assert {n: h.parameter(n).requires_grad for n in h.trainable_names} == flags  # put back
    index = torch.randperm(len(client.train), generator=torch.Generator().manual_seed(_seed("fedhello-fim", 0, 1, 1)))[:FIM_EXAMPLES]
    assert len(index) == 32
    h.set_trainable(h.trainable_names, True)
    sim.model.eval()
    squares = {n: torch.zeros_like(h.parameter(n), dtype=F64) for k in h.keys.values() for n in (k.B, k.A)}
    for i in index.tolist():
        sim.model.zero_grad(set_to_none=True)
        sim.task.loss(sim.model, client.train.batch(torch.tensor([i]), "cpu")).backward()
        for n in squares:
            squares[n] += h.parameter(n).grad.double() ** 2
    want = torch.zeros(2, dtype=F64)
    for module, k in h.keys.items():
        for n in (k.B, k.A):
            want[block_of(module)] += torch.linalg.norm(squares[n] / 32)
    assert float(want.min()) > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_a_fim_run_by_hand_bytes_allocation_and_resume(small_csv, tmp_path):
    """fim every round: round 1 allocates by bottleneck and its clients send 2 scores (L = 2 blocks), the server's
    w-mean goes through the k-means to the probabilities used from round 2, sent down (2 floats); bytes by hand; a
    run resumed from its round-1 checkpoint ends with the same metrics."""
    from conftest import resume_matches
    from fedlora.aggregation.fedhello import _seed, fim_probabilities
    from fedlora.federation.methods.fedhello import FIM, SCORES

    cfg = tiny_config(small_csv, method="fedhello", method_options="fedhello-pattern=fim,fedhello-fim-every=1,fedhello-layers=1", rounds=2)
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    seen = spy_on(sim)
    history = sim.run()
    bottleneck = layer_probabilities(2, "bottleneck")
    for (ctx, uploads, weights, _, update), m in zip(seen, history):
        probs = bottleneck if ctx.number == 1 else method.fim[ctx.number]
        F = sum(float(w) * u[SCORES].double() for w, u in zip(weights, uploads)) / float(weights.sum())
        made = fim_probabilities(F, _seed("fedhello-kmeans", 0, ctx.number)).float()
        torch.testing.assert_close(update.broadcast[FIM], made)
        torch.testing.assert_close(method.fim[ctx.number + 1], made.double())
        up = down = 0
        for peer, upload in zip(ctx.peers, uploads):
            blocks = set(allocate([0, 1], 1, probs, 0, ctx.number, peer.cid))
            assert blocks == method.allocated(ctx.number, peer.cid)
            assert {block_of(mod) for mod, k in h.keys.items() if k.B in upload} == blocks
            up += sum(R * (D + K) for mod in h.keys if block_of(mod) in blocks) + HEAD + 2  # the 2 scores
            down += MODULES * R * (D + K) + HEAD + 2  # the 2 probabilities
        assert (m["bytes_up"], m["bytes_down"]) == (F32 * up, F32 * down)
    for p in sim.peers:  # each client holds the last allocation it received; the server's model holds none
        torch.testing.assert_close(sim.held[p.cid][FIM].double(), method.fim[3])
    assert FIM not in sim.global_tensors and set(method.server_state()) == {"fim/2", "fim/3"}
    resume_matches(cfg, tmp_path, KEYS, history)


def test_fim_on_flower_equals_in_process(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="fedhello", method_options="fedhello-pattern=fim,fedhello-fim-every=1,fedhello-layers=1,2,1",
                      rounds=2, fraction=0.67)  # a client sampled only in round 2 catches up on round 1's allocation
    flower_resume_and_export(cfg, tmp_path, KEYS)
