"""HiLoRA (METHODS.md, wave 3): the root rule is the best rank-r fit of M against a brute-force dense SVD with an
orthonormal B; the tracked B̄ by hand; clustering recovers planted subspace clusters and K* against a brute-force
eigengap; the orthogonality terms by hand; the schedule; bytes per stage by hand; 4 rounds (root, cluster, cluster,
leaf) × 4 clients in-process; a resume from a cluster-stage checkpoint; the export is the root tier alone."""

import math

import numpy as np
import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.aggregation import aggregate
from fedlora.aggregation.hilora import affinity, eigengap_k, spectral_clusters, subspace_distances, track
from fedlora.app.experiment import build
from fedlora.federation import REGISTRY, make_method
from fedlora.federation.methods.hilora import parse_stages
from fedlora.federation.protocol import FOLD_L, FOLD_R

F64 = torch.float64
D = K = 32
MODULES = 4
R = 4
HEAD = 3 * 32 + 3
F32 = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(4))
def test_root_rule_is_the_best_rank_r_fit_with_orthonormal_B(seed):
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(12, 3, generator=gen, dtype=F64) for _ in range(4)]
    As = [torch.randn(3, 9, generator=gen, dtype=F64) for _ in range(4)]
    w = torch.rand(4, generator=gen, dtype=F64)
    w /= w.sum()
    res = aggregate("hilora", Bs, As, w)
    M = sum(wi * B @ A for wi, B, A in zip(w, Bs, As))
    U, S, Vh = torch.linalg.svd(M)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close(res.B @ res.A, best, rtol=0, atol=1e-9 * float(S[0]))
    torch.testing.assert_close(res.B.T @ res.B, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(res.A, res.B.T @ M, rtol=0, atol=1e-9 * float(S[0]))  # A_r = Σ_r V_rᵀ


def test_tracked_B_by_hand():
    gen = torch.Generator().manual_seed(1)
    B1, B2 = torch.randn(6, 2, generator=gen, dtype=F64), torch.randn(6, 2, generator=gen, dtype=F64)
    first = track(None, B1, 0.9)
    torch.testing.assert_close(first, B1 / B1.norm())
    y = 0.9 * first + 0.1 * B2 / B2.norm()
    torch.testing.assert_close(track(first, B2, 0.9), y / y.norm())
    assert track(first, torch.zeros(6, 2, dtype=F64), 0.9) is first  # a zero B has no direction


def planted(groups, per, d=16, r=2, noise=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, groups * r, generator=gen, dtype=F64))[0]  # mutually orthogonal subspaces
    bases = [Q[:, g * r:(g + 1) * r] for g in range(groups)]
    tracked, truth = [], []
    for g in range(groups):
        for _ in range(per):
            mix = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))[0]  # a well-conditioned basis of the same span
            B = bases[g] @ mix + noise * torch.randn(d, r, generator=gen, dtype=F64)
            tracked.append({"m1": B, "m2": B + noise * torch.randn(d, r, generator=gen, dtype=F64)})
            truth.append(g)
    return tracked, truth


@pytest.mark.parametrize("groups,per", [(2, 3), (3, 3), (4, 2)])
def test_clustering_recovers_planted_subspaces_and_K_by_eigengap(groups, per):
    tracked, truth = planted(groups, per, seed=groups)
    labels, info = spectral_clusters(tracked, 2, seed=0)
    assert info["k"] == groups
    pairs = {(a, b) for a, b in zip(labels, truth)}
    assert len(pairs) == groups and len(set(labels)) == groups  # the same partition, up to names
    assert labels[0] == 0
    # brute force: distances, affinity, normalised Laplacian, eigengap in numpy
    n = len(tracked)
    dist = np.zeros((n, n))
    for m in ("m1", "m2"):
        Us = [np.linalg.svd(t[m].numpy(), full_matrices=False)[0][:, :2] for t in tracked]
        dist += np.array([[1 - np.linalg.norm(a.T @ b) ** 2 / 2 for b in Us] for a in Us]) / 2
    np.fill_diagonal(dist, 0)
    np.testing.assert_allclose(subspace_distances(tracked, 2).numpy(), dist, atol=1e-10)
    sigma = np.median(dist[~np.eye(n, dtype=bool)])
    S = np.exp(-dist**2 / (2 * sigma**2))
    np.fill_diagonal(S, 0)
    np.testing.assert_allclose(affinity(torch.from_numpy(dist)).numpy(), S, atol=1e-12)
    dm = np.diag(S.sum(1) ** -0.5)
    lam = np.sort(np.linalg.eigvalsh(np.eye(n) - dm @ S @ dm))
    gaps = {K: lam[K] - lam[K - 1] for K in range(2, min(10, n - 1) + 1)}
    assert info["k"] == max(gaps, key=gaps.get) == eigengap_k(torch.from_numpy(lam), n)


def test_schedule_and_bad_options():
    assert parse_stages("auto", 10) == (3, 4) and parse_stages("auto", 4) == (2, 2) and parse_stages("1,2", 9) == (1, 2)
    m = make_method("hilora", stages="1,2")
    m.schedule(4, 4)
    assert [m.stage(t) for t in range(1, 6)] == ["root", "cluster", "cluster", "leaf", "leaf"]
    with pytest.raises(ValueError, match="hilora-stages='x' is not 'auto'"):
        make_method("hilora", stages="x")
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"method hilora does not support adapter {adapter}: .*choose lora or rslora"):
            make_method("hilora", adapter)
    cls = REGISTRY["hilora"]
    assert cls.personalised and not cls.linear and not cls.mixed_ranks and not cls.server_opt and cls.server_opt_refusal


def test_four_rounds_all_stages_four_clients(small_csv):
    cfg = tiny_config(small_csv, method="hilora", clients=4, rounds=4, method_options="hilora-stages=1,2")
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    seen = []
    original = method.aggregate

    def spy(h_, ups, weights, current, ctx):
        update = original(h_, ups, weights, current, ctx)
        seen.append((ups, weights, update))
        return update

    method.aggregate = spy
    leaf_before = None
    for rnd in range(1, 5):
        if rnd == 4:
            leaf_before = {c: dict(sim.held[c]) for c in range(4)}
        sim.round(rnd)
    history = sim.history
    # round 1 (root, the switch): the fold is the root rule on the uploads, B_r orthonormal
    ups, w, update = seen[0]
    for m, k in h.keys.items():
        Bs, As = [u[k.B] for u in ups], [u[k.A] for u in ups]
        res = aggregate("hilora", Bs, As, w)
        torch.testing.assert_close(update.broadcast[f"{m}.{FOLD_L}"], res.B)
        torch.testing.assert_close(update.broadcast[f"{m}.{FOLD_R}"], res.A)
        B_r = method.root_B[m]
        torch.testing.assert_close(B_r.T @ B_r, torch.eye(R), rtol=0, atol=1e-5)
        assert torch.count_nonzero(sim.global_tensors[k.B]) == 0  # the global model: the root tier alone (folded)
    assert sorted(method.labels) == [0, 1, 2, 3] and history[0]["hilora_clusters"] == [method.labels[c] for c in range(4)]
    # bytes by hand: r(d+k) per matrix and the head each way in rounds 1..3 (+ one int32 cluster id down at the switch)
    factors = F32 * (MODULES * R * (D + K) + HEAD)
    assert history[0]["bytes_up"] == 4 * factors and history[0]["bytes_down"] == 4 * (factors + 4)
    for m_ in history[1:3]:
        assert m_["bytes_up"] == 4 * factors and m_["bytes_down"] == 4 * factors
    assert history[3]["bytes_up"] == 0 and history[3]["bytes_down"] == 0
    # cluster stage: each client holds its cluster's LoRA, the root rule over the cluster's members
    ups, w, update = seen[2]
    for c in set(method.labels.values()):
        members = [i for i, cid in enumerate(history[2]["clients"]) if method.labels[cid] == c]
        for k in h.keys.values():
            res = aggregate("hilora", [ups[i][k.B] for i in members], [ups[i][k.A] for i in members], w[members] / w[members].sum())
            for cid in (cid for cid, lab in method.labels.items() if lab == c):
                torch.testing.assert_close(sim.held[cid][k.B] @ sim.held[cid][k.A], res.B @ res.A, rtol=0, atol=1e-5)
    # leaf stage: nothing travels, the cluster tier is kept, each client keeps its own leaf LoRA
    assert seen[3][0] == [{} for _ in range(4)]
    for c in range(4):
        for k in h.keys.values():
            assert torch.equal(sim.held[c][k.B], leaf_before[c][k.B])
            leaf = k.B.replace(".default.", ".leaf.")
            assert torch.count_nonzero(sim.private[c][leaf]) > 0
    assert all(math.isfinite(m_["global_accuracy"]) and math.isfinite(m_["local_accuracy"]) for m_ in history)


def test_orthogonality_terms_by_hand(small_csv):
    cfg = tiny_config(small_csv, method="hilora", clients=3, rounds=3, method_options="hilora-stages=1,1")
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    gen = torch.Generator().manual_seed(3)
    method.root_B = {m: torch.linalg.qr(torch.randn(D, R, generator=gen))[0] for m in h.keys}
    state = {n: torch.randn_like(t) for n, t in h.get().items()}
    h.set(state)
    peer = sim.peers[0]
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, 2), False)  # cluster stage
    want = sum(0.1 * (method.root_B[m].T @ state[k.B]).pow(2).sum() for m, k in h.keys.items())
    torch.testing.assert_close(method.loss_term(h, peer), want)
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, 3), False)  # leaf stage
    leaf = {m: state[k.B.replace(".default.", ".leaf.")] for m, k in h.keys.items()}
    want = sum(0.1 * (method.root_B[m].T @ leaf[m]).pow(2).sum() + 0.1 * (state[k.B].T @ leaf[m]).pow(2).sum()
               for m, k in h.keys.items())
    torch.testing.assert_close(method.loss_term(h, peer), want)


def test_resume_in_the_cluster_stage_and_export_is_the_root_tier(small_csv, tmp_path):
    from fedlora.app.experiment import run_experiment
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask

    cfg = tiny_config(small_csv, method="hilora", clients=4, rounds=4, method_options="hilora-stages=1,2")
    reference = build(cfg).simulator.run()
    resume_matches(cfg, tmp_path, ("clients", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss"),
                   reference, after=2)

    out = tmp_path / "run"
    exp, history = run_experiment(cfg.replace(out=str(out)))
    model, _, _ = load_global_model(out)
    acc = ClassificationTask().evaluate(model, exp.simulator.global_test)
    assert acc == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)


def test_the_flower_in_process_round_equals_the_simulator_through_every_stage(small_csv, tmp_path):
    """Root, switch, cluster and leaf rounds through the Flower ServerApp/ClientApp message path: the same history."""
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="hilora", clients=4, rounds=4, method_options="hilora-stages=1,2")
    reference = build(cfg).simulator.run()
    assert_same_history(run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower"))), reference)


def _never_in_root(cfg, root):
    from fedlora.federation.simulator import sample_clients

    seen = {c for rnd in range(1, root + 1) for c in sample_clients(cfg.clients, cfg.fraction, cfg.seed, rnd)}
    return sorted(set(range(cfg.clients)) - seen)


def test_clients_never_sampled_in_the_root_stage_train_a_probe_round(small_csv, capsys):
    """fraction 0.4 of 5 clients, root stage 1 round: the 3 unsampled clients train a probe in the switch round (they
    get a B̄ and a cluster), outside the root rule; their bytes are that round's, by hand; D in the metrics line."""
    cfg = tiny_config(small_csv, method="hilora", clients=5, rounds=2, fraction=0.4, method_options="hilora-stages=1,1")
    probes = _never_in_root(cfg, 1)
    assert len(probes) == 3
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    seen = []
    original = method.aggregate

    def spy(h_, ups, weights, current, ctx):
        seen.append((list(ups), weights.clone(), [p.cid for p in ctx.peers]))
        return original(h_, ups, weights, current, ctx)

    method.aggregate = spy
    first = sim.round(1)
    assert first["clients"] == [0, 1, 2, 3, 4] and first["hilora_probes"] == probes
    assert sorted(method.labels) == [0, 1, 2, 3, 4] and first["hilora_clusters"] == [method.labels[c] for c in range(5)]
    # the root rule is the sampled clients' alone (weights renormalised over them)
    ups, w, cids = seen[0]
    rooted = [i for i, c in enumerate(cids) if c not in probes]
    for m, k in h.keys.items():
        res = aggregate("hilora", [ups[i][k.B] for i in rooted], [ups[i][k.A] for i in rooted], w[rooted] / w[rooted].sum())
        torch.testing.assert_close(method.root_B[m], res.B)
    # bytes by hand: five clients up r(d+k) per matrix and the head; down the same and the cluster id
    factors = F32 * (MODULES * R * (D + K) + HEAD)
    assert first["bytes_up"] == 5 * factors and first["bytes_down"] == 5 * (factors + 4)
    # the clustering's diagnostics: D symmetric, zero diagonal, in [0, 1]; K* and its eigengap
    dist = torch.tensor(first["hilora_distances"], dtype=F64)
    assert dist.shape == (5, 5) and torch.equal(dist, dist.T) and torch.count_nonzero(dist.diagonal()) == 0
    assert float(dist.min()) >= 0 and float(dist.max()) <= 1
    assert first["hilora_k"] == len(set(first["hilora_clusters"])) and 2 <= first["hilora_k"] <= 4
    assert first["hilora_eigengap"] > 0
    with capsys.disabled():
        print("\nhilora D (1 root round, 5 clients, 3 probes):", first["hilora_distances"], "K*", first["hilora_k"],
              "gap", round(first["hilora_eigengap"], 4))
    second = sim.round(2)
    assert "hilora_probes" not in second and "hilora_distances" not in second and math.isfinite(second["global_accuracy"])


def test_resume_across_the_switch_with_probes(small_csv, tmp_path):
    from conftest import resume_matches

    cfg = tiny_config(small_csv, method="hilora", clients=5, rounds=3, fraction=0.4, method_options="hilora-stages=2,1")
    assert _never_in_root(cfg, 2)  # the switch (round 2) has probes
    reference = build(cfg).simulator.run()
    assert reference[1]["hilora_probes"] == _never_in_root(cfg, 2)
    resume_matches(cfg, tmp_path, ("clients", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss"),
                   reference)


def test_the_flower_in_process_round_equals_the_simulator_with_probes(small_csv, tmp_path):
    """The probe clients are added to the switch round by the Flower strategy as by the simulator."""
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="hilora", clients=5, rounds=2, fraction=0.4, method_options="hilora-stages=1,1")
    reference = build(cfg).simulator.run()
    assert reference[0]["hilora_probes"]
    assert_same_history(run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower"))), reference)
