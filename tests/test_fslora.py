"""FSLoRA (METHODS.md, wave 3): seeded sketches of a global rank-r adapter, unbiased over all index sets; the server's
pseudo-gradient scatter with zeros; k_u = r is FedIT; per-client delivery and its bytes; Flower, resume, export."""

import itertools
import math

import pytest
import torch

from conftest import flower_resume_and_export, tiny_config
from fedlora.aggregation import aggregate
from fedlora.aggregation.fslora import sketch_indices, sketch_mean, sketch_seed
from fedlora.app.experiment import build
from fedlora.federation import make_method

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
D = K = 32
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4
KEYS = ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")


def factors(d, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)


@pytest.mark.parametrize("r", [1, 3, 5, 6])
def test_the_sketch_is_unbiased_over_all_index_sets(r):
    """Σ_{|J|=k} (r/k) B_J A_J / C(r, k) = BA exactly, for every k (brute force over the combinations)."""
    B, A = factors(9, 7, r, seed=r)
    for k in range(1, r + 1):
        sets = [torch.tensor(J) for J in itertools.combinations(range(r), k)]
        assert len(sets) == math.comb(r, k)
        torch.testing.assert_close(sketch_mean(B, A, sets), B @ A, rtol=1e-12, atol=1e-12)
    if r > 2:  # a biased sketch (no r/k) is caught
        k = r - 1
        sets = [torch.tensor(J) for J in itertools.combinations(range(r), k)]
        assert not torch.allclose(sum(B[:, J] @ A[J] for J in sets) / len(sets), B @ A)


def test_index_sets_are_seeded_sorted_distinct_and_differ_by_client_module_and_round():
    J = sketch_indices(8, 3, sketch_seed(11, 0, "m"))
    assert J.tolist() == sorted(set(J.tolist())) and len(J) == 3 and 0 <= J.min() and J.max() < 8
    assert torch.equal(J, sketch_indices(8, 3, sketch_seed(11, 0, "m")))  # the server draws the client's set
    draws = {tuple(sketch_indices(8, 3, sketch_seed(s, c, m)).tolist()) for s in (1, 2) for c in (0, 1) for m in ("q", "v")}
    assert len(draws) > 4
    assert sketch_indices(5, 5, 3).tolist() == [0, 1, 2, 3, 4]  # k = r: the global factors as they are
    with pytest.raises(ValueError, match="sketch size 6 is outside 1..5"):
        sketch_indices(5, 6, 0)


def test_the_server_rule_scatters_with_zeros_and_steps_once():
    """x_{t+1} = x_t − Σ_u w_u P_u(x_t[J_u] − x_u), against a dense loop; a component one client trained moves by its
    weight only (no renormalisation); components nobody trained stay."""
    r, d, k = 6, 10, 8
    Bt, At = factors(d, k, r, seed=1)
    sets = [torch.tensor([0, 2, 3]), torch.tensor([2, 5]), torch.tensor([0, 2, 3, 4])]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    Bs = [Bt[:, J] + 0.1 * factors(d, k, len(J), seed=10 + i)[0] for i, J in enumerate(sets)]
    As = [At[J] + 0.1 * factors(d, k, len(J), seed=20 + i)[1] for i, J in enumerate(sets)]
    res = aggregate("fslora", Bs, As, w, index_sets=sets, start=(Bt, At))
    gB, gA = torch.zeros_like(Bt), torch.zeros_like(At)
    for wu, J, Bu, Au in zip(w, sets, Bs, As):
        gB[:, J] += wu * (Bt[:, J] - Bu)
        gA[J] += wu * (At[J] - Au)
    torch.testing.assert_close(res.B, Bt - gB)
    torch.testing.assert_close(res.A, At - gA)
    torch.testing.assert_close(res.A[5], 0.7 * At[5] + 0.3 * As[1][1])  # client 1 alone, weight 0.3: not renormalised
    torch.testing.assert_close(res.A[1], At[1])  # nobody trained component 1
    with pytest.raises(ValueError, match="pass start="):
        aggregate("fslora", Bs, As, w, index_sets=sets)


def test_full_sketches_are_fedit():
    r = 4
    Bt, At = factors(12, 9, r, seed=3)
    Bs, As = zip(*(factors(12, 9, r, seed=30 + u) for u in range(3)))
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    full = [torch.arange(r)] * 3
    fedit = aggregate("fedit", list(Bs), list(As), w)
    for res in (aggregate("fslora", list(Bs), list(As), w, index_sets=full, start=(Bt, At)), aggregate("fslora", list(Bs), list(As), w)):
        torch.testing.assert_close(res.B, fedit.B, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.A, fedit.A, rtol=1e-12, atol=1e-12)


def test_sketch_sizes_default_to_half_the_rank_and_are_refused_above_it(small_csv):
    cfg = tiny_config(small_csv, method="fslora", rank=5)
    assert cfg.ranks() == [3, 3, 3] and cfg.adapter_spec().r == 5  # ⌈5/2⌉; the model holds --rank
    cfg = tiny_config(small_csv, method="fslora", rank=4, client_ranks="1,2,4")
    assert cfg.ranks() == [1, 2, 4] and cfg.adapter_spec().r == 4
    with pytest.raises(ValueError, match="sketch sizes of the global rank 4, but 6 exceeds it"):
        tiny_config(small_csv, method="fslora", rank=4, client_ranks="2,6").validate()
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"does not support adapter {adapter}"):
            make_method("fslora", adapter)
    with pytest.raises(ValueError, match="secure aggregation: method fslora needs each client's factors"):
        tiny_config(small_csv, method="fslora", secure_aggregation=True).validate()


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_clients_train_their_sketch_at_scale_s_r_over_k(small_csv, adapter):
    """Each client's view is its seeded sketch of the global factors, unscaled; it trains at s·r/k_u (rsLoRA: set
    explicitly, α√r/k_u); the bytes are k_u(d+k) per matrix each way, plus the head."""
    cfg = tiny_config(small_csv, method="fslora", adapter=adapter, rank=4, client_ranks="1,2,4", lora_alpha=8.0)
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    s = h.spec.scale_at(4)
    assert [p.scale for p in sim.peers] == pytest.approx([s * 4 / k for k in (1, 2, 4)])
    if adapter == "rslora":
        assert sim.peers[0].scale == pytest.approx(8.0 * 2 / 1) and sim.peers[0].scale != pytest.approx(h.spec.scale_at(1))  # not α/√k
    seen = []
    inner = sim.turn

    def spy(h_, method_, task, client, start, cfg_, rnd):
        out = inner(h_, method_, task, client, start, cfg_, rnd)
        seen.append((rnd, client.cid, float(next(iter(h_.layers.values())).scaling["default"])))
        return out

    sim.turn = spy
    history = sim.run()
    assert [(r, c) for r, c, _ in seen] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [x for _, _, x in seen] == pytest.approx([p.scale for p in sim.peers] * 2)
    for m in history:
        per = sum(MODULES * k * (D + K) + HEAD for k in (1, 2, 4)) * F32
        assert (m["bytes_up"], m["bytes_down"]) == (per, per) and not m["rejected"]
        assert math.isfinite(m["divergence"])
    # what each client holds: the global factors at its sketch for round 3 (the server draws the same J)
    seed = sim.config.seed
    from fedlora.federation.simulator import round_seed

    for p in sim.peers:
        for module, k in h.keys.items():
            J = method.index_set(h, p, module, round_seed(seed, 3))
            assert len(J) == p.rank
            torch.testing.assert_close(sim.held[p.cid][k.B], sim.global_tensors[k.B][:, J])
            torch.testing.assert_close(sim.held[p.cid][k.A], sim.global_tensors[k.A][J])


def test_with_every_sketch_the_full_rank_it_is_fedit_end_to_end(small_csv):
    ref = build(tiny_config(small_csv, method="fedit")).simulator
    ref_history = ref.run()
    sim = build(tiny_config(small_csv, method="fslora", client_ranks="4")).simulator
    history = sim.run()
    for a, b in zip(history, ref_history):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=0.02)
    for n, t in ref.global_tensors.items():
        torch.testing.assert_close(sim.global_tensors[n], t, rtol=1e-4, atol=1e-5)


def test_flower_in_process_round_resume_and_export(small_csv, tmp_path):
    cfg = tiny_config(small_csv, method="fslora", client_ranks="1,2,3", rounds=3, fraction=0.67)
    flower_resume_and_export(cfg, tmp_path, KEYS)
