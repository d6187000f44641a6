"""FedLEASE (METHODS.md, wave 3): clustering by the round-0 B's (planted clusters, K* by silhouette), expert init from
both factors, the top-M routing and its forward, frozen experts, per-cluster aggregation, bytes, resume, export."""

import itertools

import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.adapters.structures import ExpertsA, ExpertsB, routing_weights, slot_map
from fedlora.aggregation.fedlease import cluster_clients, expert_init, lease_distances, silhouette
from fedlora.app.experiment import build, run_experiment
from fedlora.federation import make_method

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
D = K = 32
R = 4
HEAD = 3 * 32 + 3
F32 = 4


def planted(sizes, layers=3, seed=0, noise=0.05):
    """Clients' B per layer: a cluster centre plus small noise, so the planted clusters are far apart in cosine."""
    g = torch.Generator().manual_seed(seed)
    centres = [[torch.randn(9, 3, generator=g, dtype=F64) for _ in range(layers)] for _ in sizes]
    Bs, truth = [], []
    for j, n in enumerate(sizes):
        for _ in range(n):
            Bs.append([c + noise * torch.randn(c.shape, generator=g, dtype=F64) for c in centres[j]])
            truth.append(j)
    perm = torch.randperm(len(Bs), generator=g).tolist()
    return [Bs[i] for i in perm], [truth[i] for i in perm]


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i, j in itertools.combinations(range(len(a)), 2))


@pytest.mark.parametrize("sizes", [(3, 4), (2, 3, 3), (4, 2, 3, 2)])
def test_clustering_recovers_planted_clusters(sizes):
    Bs, truth = planted(sizes, seed=len(sizes))
    D_ = lease_distances(Bs)
    u, v = 0, 1
    expect = sum(1 - torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()) for a, b in zip(Bs[u], Bs[v])) / len(Bs[u])
    assert float(D_[u, v]) == pytest.approx(float(expect), abs=1e-12) and float(D_[u, u]) == 0.0
    labels, scores = cluster_clients(D_)
    assert max(labels) + 1 == len(sizes) and same_partition(labels, truth)
    assert labels[0] == 0  # renumbered in order of first appearance
    assert max(scores, key=lambda k: (scores[k], -k)) == len(sizes)


def test_silhouette_matches_a_brute_force_and_scikit_learn():
    Bs, _ = planted((3, 3, 2), seed=7, noise=0.6)
    D_ = lease_distances(Bs)
    labels, scores = cluster_clients(D_)
    n = len(Bs)

    def brute(lab):
        s = []
        for i in range(n):
            mine = [j for j in range(n) if lab[j] == lab[i] and j != i]
            if not mine:
                s.append(0.0)
                continue
            a = sum(float(D_[i, j]) for j in mine) / len(mine)
            b = min(sum(float(D_[i, j]) for j in range(n) if lab[j] == c) / lab.count(c) for c in set(lab) if c != lab[i])
            s.append((b - a) / max(a, b))
        return sum(s) / n

    assert silhouette(D_, labels) == pytest.approx(brute(labels), abs=1e-12)
    sk = pytest.importorskip("sklearn.metrics")
    assert silhouette(D_, labels) == pytest.approx(float(sk.silhouette_score(D_.numpy(), labels, metric="precomputed")), abs=1e-12)
    # K* is the best silhouette over K = 2..min(8, N−1) (brute force over the tree's cuts)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    tree = linkage(squareform(D_.numpy(), checks=False), method="average")
    cuts = {k: fcluster(tree, t=k, criterion="maxclust").tolist() for k in range(2, min(8, n - 1) + 1)}
    assert set(scores) == set(cuts)
    for k in cuts:
        assert scores[k] == pytest.approx(brute(cuts[k]), abs=1e-12)
    best = max(cuts, key=lambda k: (brute(cuts[k]), -k))
    assert max(labels) + 1 == len(set(cuts[best]))
    assert cluster_clients(D_[:2, :2])[0] == [0, 0]  # N ≤ 2: one cluster


def test_a_zero_B_is_at_distance_one_not_nan():
    Bs = [[torch.zeros(4, 2, dtype=F64)], [torch.ones(4, 2, dtype=F64)], [torch.ones(4, 2, dtype=F64)]]
    D_ = lease_distances(Bs)
    assert torch.isfinite(D_).all() and float(D_[0, 1]) == 1.0 and float(D_[1, 2]) == pytest.approx(0.0, abs=1e-12)


def test_expert_init_is_the_weighted_mean_of_both_factors():
    g = torch.Generator().manual_seed(3)
    Bs = [torch.randn(6, 2, generator=g, dtype=F64) for _ in range(5)]
    As = [torch.randn(2, 7, generator=g, dtype=F64) for _ in range(5)]
    w = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=F64)
    labels = [1, 0, 1, 0, 1]  # cluster 1: clients 0, 2, 4
    experts = expert_init(Bs, As, w, labels)
    W = 0.1 + 0.2 + 0.15
    torch.testing.assert_close(experts[1][0], (0.1 * Bs[0] + 0.2 * Bs[2] + 0.15 * Bs[4]) / W)
    torch.testing.assert_close(experts[1][1], (0.1 * As[0] + 0.2 * As[2] + 0.15 * As[4]) / W)
    torch.testing.assert_close(experts[0][1], (0.3 * As[1] + 0.25 * As[3]) / 0.55)


@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_a_zero_router_chooses_only_the_clients_expert_with_weight_M_over_2M_minus_1(M):
    for c in range(M):
        slots = torch.tensor(slot_map(c, M) + [-1] * 3, dtype=F64)
        omega = routing_weights(torch.zeros(4, len(slots), dtype=F64), slots, M + 2)
        expect = torch.zeros(M + 2, dtype=F64)
        expect[c] = M / (2 * M - 1)
        torch.testing.assert_close(omega, expect.expand(4, -1))


def test_the_forward_equals_a_hand_computation():
    torch.manual_seed(0)
    E, M, c, r, k, d = 4, 3, 1, 2, 5, 6
    A0, B0 = torch.randn(r, k, dtype=F64), torch.randn(d, r, dtype=F64)
    la, lb = ExpertsA(A0, E), ExpertsB(B0, E)
    with torch.no_grad():
        for p in list(la.more) + list(lb.more):
            p.copy_(torch.randn(p.shape, dtype=F64))
        la.router.weight.copy_(torch.randn(la.router.weight.shape, dtype=F64))
        la.router.bias.copy_(torch.randn(la.router.bias.shape, dtype=F64))
        la.slots.copy_(torch.tensor(slot_map(c, M) + [-1] * (2 * E - 1 - (2 * M - 1)), dtype=F64))
    x = torch.randn(7, k, dtype=F64)
    y = lb(la(x))
    As, Bs = la.experts(), lb.experts()
    mapping = [c] * M + [e for e in range(M) if e != c]
    for i in range(len(x)):
        logits = la.router.weight[: 2 * M - 1] @ x[i] + la.router.bias[: 2 * M - 1]
        p = torch.softmax(logits, 0)
        top = sorted(range(2 * M - 1), key=lambda j: (-float(p[j].detach()), j))[:M]
        omega = [sum(float(p[j].detach()) for j in top if mapping[j] == e) for e in range(M)]
        expect = sum(omega[e] * (Bs[e] @ As[e] @ x[i]) for e in range(M))
        torch.testing.assert_close(y[i], expect.detach())
    assert float(omega[c]) > 0  # c is always chosen


def test_ties_go_to_the_lower_slot():
    slots = torch.tensor(slot_map(0, 3), dtype=F64)
    logits = torch.tensor([[-9.0, -9.0, -9.0, 1.0, 1.0]], dtype=F64)  # slots 3, 4 (experts 1, 2) tie at the top
    omega = routing_weights(logits, slots, 3)
    p = torch.softmax(logits[0], 0)
    torch.testing.assert_close(omega[0], torch.stack([p[0], p[3], p[4]]))


@pytest.fixture(scope="module")
def lease_run(small_csv):
    cfg = tiny_config(small_csv, method="fedlease", clients=4, fraction=0.75)
    sim = build(cfg).simulator
    seen = []
    inner = sim.method.aggregate

    def spy(h, uploads, weights, current, ctx):
        update = inner(h, uploads, weights, current, ctx)
        seen.append((ctx, uploads, weights, dict(current), update))
        return update

    sim.method.aggregate = spy
    setup = []
    inner_setup = sim.method.setup_aggregate

    def spy_setup(h, uploads, weights, current, peers=None):
        out = inner_setup(h, uploads, weights, current, peers=peers)
        setup.append((uploads, weights, out))
        return out

    sim.method.setup_aggregate = spy_setup
    history = sim.run()
    return cfg, sim, seen, setup, history


def test_round_zero_clusters_and_initialises_both_factors_of_every_expert(lease_run):
    _, sim, _, setup, _ = lease_run
    h, method = sim.handle, sim.method
    (uploads, weights, out), = setup
    assert len(uploads) == 4 and any(float(u[h.keys[m].B].abs().max()) > 0 for u in uploads for m in h.keys)  # round 0 trained
    labels = out["fedlease.clusters"][1].tolist()
    M = max(labels) + 1
    for e in range(M):
        members = [u for u in range(4) if labels[u] == e]
        w = weights[members] / weights[members].sum()
        for module, (nB, nA) in method.expert_names(h, e).items():
            k = h.keys[module]
            torch.testing.assert_close(out[nB], sum(float(wi) * uploads[u][k.B] for wi, u in zip(w, members)))
            torch.testing.assert_close(out[nA], sum(float(wi) * uploads[u][k.A] for wi, u in zip(w, members)))
    for cid in range(4):  # each client's slot map is its cluster's
        slots = sim.held[cid][method.slot_names(h)[0]] if cid not in sim.private else sim.private[cid][method.slot_names(h)[0]]
        assert method.cluster_of(slots) == (labels[cid], M)


def test_experts_average_over_sampled_members_only_and_bytes_are_by_hand(lease_run):
    _, sim, seen, setup, history = lease_run
    h, method = sim.handle, sim.method
    labels = setup[0][2]["fedlease.clusters"][1].tolist()
    M = max(labels) + 1
    layers = len(h.layers)
    for (ctx, uploads, weights, current, update), m in zip(seen, history):
        cids = [p.cid for p in ctx.peers]
        for e in range(M):
            members = [i for i, cid in enumerate(cids) if labels[cid] == e]
            for nB, nA in method.expert_names(h, e).values():
                if not members:  # no sampled member: unchanged
                    assert torch.equal(update.broadcast[nB], current[nB]) and torch.equal(update.broadcast[nA], current[nA])
                    continue
                w = weights[members] / weights[members].sum()
                torch.testing.assert_close(update.broadcast[nB], sum(float(wi) * uploads[i][nB] for wi, i in zip(w, members)))
        for i, u in enumerate(uploads):  # only its cluster's expert goes up; the router (and slots) as eval extras only
            sent = {n for pair in method.expert_names(h, labels[cids[i]]).values() for n in pair} | set(h.head_names)
            assert set(u) == sent | set(method.private(h))
        up = len(cids) * (layers * R * (D + K) + HEAD)
        # a client sampled now that missed the last round's broadcast is sent that one too (counted in this row)
        catch_up = 0 if ctx.number == 1 else len(set(cids) - {p.cid for p in seen[ctx.number - 2][0].peers})
        down = (len(cids) + catch_up) * (M * layers * R * (D + K) + HEAD)
        if ctx.number == 1:  # round 0: all 4 clients up (B_u, A_u); down every expert and (c_u, M) as two int64
            up += 4 * layers * R * (D + K)
            down_bytes = F32 * down + 4 * (F32 * M * layers * R * (D + K) + 16)
        else:
            down_bytes = F32 * down
        assert (m["bytes_up"], m["bytes_down"]) == (F32 * up, down_bytes), ctx.number


def test_the_global_score_uses_each_clients_router_from_its_eval_extras(lease_run):
    """The server's copy of each client's private state (from the eval extras) is the client's own; the global
    accuracy is the mean of every client's own model with it (a client never accepted: its zero router)."""
    _, sim, _, _, history = lease_run
    h, method = sim.handle, sim.method
    assert set(method.scoring) == set(sim.private) and sim.private
    for cid, state in sim.private.items():
        assert set(state) == set(method.scoring[cid])
        for n, t in state.items():
            assert torch.equal(method.scoring[cid][n], t)
        assert any(float(state[n].abs().max()) > 0 for n in method.router_names(h))  # a trained router
    scores = []
    for cid in range(4):
        h.set(sim.held[cid] | sim.private.get(cid, {}))
        scores.append(sim.task.evaluate(sim.model, sim.global_test, "cpu"))
    h.set(sim.global_tensors)
    assert history[-1]["global_accuracy"] == pytest.approx(sum(scores) / 4, abs=1e-12)


def test_other_experts_are_frozen_and_get_no_gradient(lease_run):
    _, sim, _, setup, _ = lease_run
    h, method = sim.handle, sim.method
    cid = 0
    peer = sim.peers[cid]
    h.set(sim.held[cid] | sim.private.get(cid, {}))
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, 3, peer=peer), False)
    c, M = method.cluster_of(h.parameter(method.slot_names(h)[0]))
    batch = sim.clients[cid].train.batch(torch.arange(4), "cpu")
    sim.task.loss(h.model, batch).backward()
    for e in range(method.settings["max_experts"]):
        for nB, nA in method.expert_names(h, e).values():
            for n in (nB, nA):
                p = h.parameter(n)
                assert p.requires_grad == (e == c) and (p.grad is None) == (e != c), (e, n)
    for n in method.router_names(h):
        assert h.parameter(n).grad is not None
    for n in method.slot_names(h):
        assert not h.parameter(n).requires_grad
    h.model.zero_grad(set_to_none=True)
    h.set(sim.global_tensors)


def test_resume_keeps_clusters_experts_and_routers_and_export_refuses(lease_run, tmp_path):
    cfg, _, _, _, reference = lease_run
    def same_routers(first, resumed):
        method = resumed.method
        for cid in first.private:
            for n in method.router_names(resumed.handle) + method.slot_names(resumed.handle):
                assert torch.equal(resumed.private[cid][n], first.private[cid][n])

    resume_matches(cfg, tmp_path, ("clients", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss"),
                   reference, restored=same_routers)
    from fedlora.app.export import load_global_model

    out = tmp_path / "run"
    run_experiment(cfg.replace(rounds=1, out=str(out)))
    with pytest.raises(ValueError, match="fedlease has no one global model to load"):
        load_global_model(out)
    from fedlora.app.export import export_merged  # fedlora export --merged: no global model, and a client's routes per input

    with pytest.raises(ValueError, match="fedlease has no one global model to load"):
        export_merged(out, tmp_path / "merged")
    with pytest.raises(ValueError, match="is not a fixed linear map of its input"):
        export_merged(out, tmp_path / "merged", client=0)
    assert not (tmp_path / "merged").exists()


def test_refusals_are_one_line(small_csv):
    with pytest.raises(ValueError, match="does not support adapter dora"):
        make_method("fedlease", "dora")
    with pytest.raises(ValueError, match="fedlease-max-experts=0 is below 1"):
        make_method("fedlease", max_experts=0)
    with pytest.raises(ValueError, match="cannot train clients of different ranks"):
        tiny_config(small_csv, method="fedlease", client_ranks="2,4").validate()
