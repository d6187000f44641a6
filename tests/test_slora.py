"""SLoRA (METHODS.md, wave 3): the sparse stage's exact average on a seeded Ω, the switch's s·BA = [scatter(v̄)]_r with
its kept energy, FedIT after; bytes by hand in every stage; a run spanning the switch in-process and on Flower,
resumed before and after the switch, exported."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import resume_matches, tiny_config
from fedlora.aggregation import aggregate, comm_elements
from fedlora.aggregation.slora import scatter, sparse_indices, sparse_size, support_seed, switch_init
from fedlora.app.experiment import build, run_experiment
from fedlora.federation import make_method

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
D = K = 32  # tiny BERT: every adapted query/value matrix is 32×32
R = 4
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4
KEYS = ("clients", "divergence", "bytes_up", "bytes_down", "global_accuracy", "local_accuracy", "train_loss")
OPTIONS = "slora-stage1-rounds=2"  # rounds 1: sparse, 2: switch, 3: FedIT


def brute_truncation(M: torch.Tensor, r: int) -> tuple[np.ndarray, float]:
    """[M]_r and its kept energy by numpy's SVD (independent of the code under test)."""
    U, S, Vh = np.linalg.svd(M.numpy(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], float((S[:r] ** 2).sum() / (S**2).sum())


@pytest.mark.parametrize("seed", range(4))
def test_stage_one_is_exact_the_average_of_the_scatters(seed):
    """scatter_Ω(Σ w_u v_u) = Σ w_u scatter_Ω(v_u), and the rule's v̄ is that average; the LoRA path is untouched."""
    g = torch.Generator().manual_seed(seed)
    d, k, U = 13 + seed, 9, 2 + seed
    index = sparse_indices(d, k, 0.1, seed)
    vs = [torch.randn(len(index), generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64)
    w = w / w.sum()
    B, A = torch.zeros(d, 3, dtype=F64), torch.randn(3, k, generator=g, dtype=F64)
    agg = aggregate("slora", [B] * U, [A] * U, w, stage="sparse", values=vs)
    v_bar = agg.info["values"]
    torch.testing.assert_close(v_bar, sum(wu * v for wu, v in zip(w.tolist(), vs)), rtol=1e-12, atol=1e-12)
    ideal = sum(wu * scatter(v, index, d, k) for wu, v in zip(w.tolist(), vs))
    torch.testing.assert_close(scatter(v_bar, index, d, k), ideal, rtol=1e-12, atol=1e-12)
    assert torch.equal(agg.B, B) and torch.equal(agg.A, A)
    dense = scatter(vs[0], index, d, k).reshape(-1)
    assert torch.equal(dense[index], vs[0]) and int((dense != 0).sum()) <= len(index)  # only Ω is written
    with pytest.raises(ValueError, match="one trained vector"):
        aggregate("slora", [B] * U, [A] * U, w, stage="sparse", values=vs[:-1])


def test_omega_is_seeded_distinct_sorted_of_size_ceil_delta_dk_and_equal_across_processes():
    index = sparse_indices(40, 30, 0.013, support_seed(7, "layer.0.query"))
    assert len(index) == math.ceil(0.013 * 40 * 30) == sparse_size(40, 30, 0.013)
    assert len(set(index.tolist())) == len(index) and torch.equal(index, index.sort().values)
    assert int(index.min()) >= 0 and int(index.max()) < 40 * 30
    assert torch.equal(index, sparse_indices(40, 30, 0.013, support_seed(7, "layer.0.query")))
    assert not torch.equal(index, sparse_indices(40, 30, 0.013, support_seed(7, "layer.0.value")))
    assert not torch.equal(index, sparse_indices(40, 30, 0.013, support_seed(8, "layer.0.query")))
    code = ("from fedlora.aggregation.slora import sparse_indices, support_seed;"
            "print(sparse_indices(40, 30, 0.013, support_seed(7, 'layer.0.query')).tolist())")
    env = os.environ | {"PYTHONHASHSEED": "123"}  # another process, another hash seed: Ω must not depend on either
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(index.tolist())


@pytest.mark.parametrize("d,k,r,density,seed", [(20, 14, 3, 0.2, 0), (12, 30, 5, 0.05, 1), (8, 8, 8, 0.5, 2), (10, 6, 2, 1.0, 3)])
def test_the_switch_starts_lora_at_the_best_rank_r_fit_of_the_sparse_update(d, k, r, density, seed):
    """s·BA = [scatter_Ω(v̄)]_r (brute-force SVD), A = V_rᵀ orthonormal rows, the kept energy and the residual."""
    g = torch.Generator().manual_seed(seed)
    index = sparse_indices(d, k, density, seed)
    delta = scatter(torch.randn(len(index), generator=g, dtype=F64), index, d, k)
    for s in (16 / r, 2.0 / math.sqrt(r)):  # LoRA's α/r and rsLoRA's α/√r: never a hard-coded 16/r
        B, A, kept, residual = switch_init(delta, r, s)
        truth, energy = brute_truncation(delta, r)
        np.testing.assert_allclose((s * B @ A).numpy(), truth, rtol=1e-9, atol=1e-10)
        m = min(r, d, k)
        torch.testing.assert_close(A[:m] @ A[:m].T, torch.eye(m, dtype=F64), rtol=1e-10, atol=1e-10)
        assert kept == pytest.approx(energy, rel=1e-10)
        torch.testing.assert_close(residual, delta - s * B @ A, rtol=1e-10, atol=1e-12)
        assert torch.linalg.matrix_norm(residual) ** 2 == pytest.approx((1 - kept) * torch.linalg.matrix_norm(delta) ** 2, rel=1e-8, abs=1e-12)
    B, A, kept, residual = switch_init(torch.zeros(d, k, dtype=F64), r, 1.0)
    assert kept == 1.0 and not B.any() and not residual.any()


def test_bytes_by_hand_in_every_stage():
    d, k, r, U = 64, 48, 4, 3
    n = math.ceil(0.01 * d * k)  # 31 elements, no indices
    assert comm_elements("slora", d, k, r, U, stage="sparse") == (n, n)
    assert comm_elements("slora", d, k, r, U, stage="switch") == (n, r * (d + k))
    assert comm_elements("slora", d, k, r, U, stage="switch", residual="fold") == (n, r * (d + k) + d * k)
    assert comm_elements("slora", d, k, r, U, stage="lora") == (r * (d + k), r * (d + k))
    method = make_method("slora")
    method.schedule(10)  # R1 = ⌈0.2·10⌉ = 2
    assert [method.stage(t) for t in (1, 2, 3, 10)] == ["sparse", "switch", "lora", "lora"]
    assert [method.declared_elements(d, k, r, U, t) for t in (1, 2, 3)] == [(n, n), (n, r * (d + k)), (r * (d + k), r * (d + k))]
    method.schedule(3)
    assert method.switch == 1
    assert make_method("slora", stage1_rounds=4).switch == 4  # an explicit R1 is kept by plan
    fixed = make_method("slora", stage1_rounds=4)
    fixed.schedule(100)
    assert fixed.switch == 4


def test_bad_options_and_adapters_fail_in_one_line():
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"does not support adapter {adapter}.*choose lora or rslora") as exc:
            make_method("slora", adapter)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="density.*pass a number in"):
        make_method("slora", density=0.0)
    with pytest.raises(ValueError, match="stage1_rounds=-1"):
        make_method("slora", stage1_rounds=-1)
    with pytest.raises(ValueError, match="different ranks"):
        make_method("slora", mixed_ranks=True)
    with pytest.raises(ValueError, match="switch round is unknown"):
        make_method("slora").stage(1)


def _spy(sim):
    """Record every round's uploads, weights and update (the method's own aggregate)."""
    seen = []
    inner = sim.method.aggregate

    def spy(h, uploads, weights, current, ctx):
        update = inner(h, uploads, weights, current, ctx)
        seen.append((uploads, weights, {n: t.clone() for n, t in current.items()}, update))
        return update

    sim.method.aggregate = spy
    return seen


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_three_rounds_across_the_switch_three_clients_in_process(small_csv, adapter):
    sim = build(tiny_config(small_csv, method="slora", adapter=adapter, rounds=3, method_options=OPTIONS)).simulator
    h = sim.handle
    seen = _spy(sim)
    B0 = h.get(h.B_names())
    for module, layer in h.layers.items():  # the model's Ω is the seeded one; its dense view is scatter_Ω
        assert torch.equal(layer.sparse_delta.index, sparse_indices(D, K, 0.01, support_seed(0, module)))
        v = torch.randn(len(layer.sparse_delta.index), dtype=F64)
        assert torch.equal(layer.sparse_delta.dense(v), scatter(v, layer.sparse_delta.index, D, K))
    history = sim.run()
    assert [x["slora_stage"] for x in history] == ["sparse", "switch", "lora"]
    v_elems = MODULES * math.ceil(0.01 * D * K)
    lora = MODULES * R * (D + K)
    hand = [(v_elems, v_elems), (v_elems, lora), (lora, lora)]  # per client, plus the head both ways
    for x, (up, down) in zip(history, hand):
        assert (x["bytes_up"], x["bytes_down"]) == (3 * F32 * (up + HEAD), 3 * F32 * (down + HEAD)), x["round"]
    assert history[0]["divergence"] == history[1]["divergence"] == 0.0  # the sparse stage is exact
    assert history[2]["divergence"] > 0  # FedIT is not

    # round 1: v̄ = Σ w_u v_u goes down, the frozen LoRA factors stay as they were (B = 0)
    uploads, w, _, update = seen[0]
    for name in h.sparse_names():
        assert all(name in u for u in uploads) and not any(n in u for u in uploads for n in h.B_names())
        torch.testing.assert_close(update.broadcast[name], sum(float(wu) * u[name] for wu, u in zip(w, uploads)))
    assert not any(n in update.broadcast for n in h.B_names() + h.A_names())
    # round 2 (the switch): s·BA = [scatter_Ω(v̄)]_r, v dropped everywhere, the kept energy reported
    uploads, w, _, update = seen[1]
    for module, k in h.keys.items():
        v_bar = sum(float(wu) * u[k.sparse].double() for wu, u in zip(w, uploads))
        truth, energy = brute_truncation(h.layers[module].sparse_delta.dense(v_bar), R)
        s = h.scaling(module)
        assert s == pytest.approx(16 / R if adapter == "lora" else 16 / math.sqrt(R))
        np.testing.assert_allclose((s * update.broadcast[k.B].double() @ update.broadcast[k.A].double()).numpy(), truth, rtol=1e-4, atol=1e-6)
        assert history[1]["slora_energy_per_layer"][module] == pytest.approx(energy, rel=1e-6)
        assert k.sparse not in update.broadcast
        assert not torch.equal(update.broadcast[k.B], B0[k.B])
    # round 3: FedIT on the factors, v frozen at zero and never sent
    uploads, _, current, update = seen[2]
    assert all(not current[n].any() for n in h.sparse_names())
    assert not any(n in u for u in uploads for n in h.sparse_names()) and not any(n in update.broadcast for n in h.sparse_names())
    assert all(not sim.global_tensors[n].any() for n in h.sparse_names())


def test_the_residual_fold_keeps_all_of_the_sparse_update(small_csv):
    sim = build(tiny_config(small_csv, method="slora", rounds=1, method_options="slora-stage1-rounds=1,slora-residual=fold")).simulator
    h = sim.handle
    seen = _spy(sim)
    base = {m: layer.get_base_layer().weight.detach().clone() for m, layer in h.layers.items()}
    x = sim.run()[0]
    uploads, w, _, update = seen[0]
    assert x["bytes_down"] == 3 * F32 * (MODULES * (R * (D + K) + D * K) + HEAD)
    for module, k in h.keys.items():
        v_bar = sum(float(wu) * u[k.sparse].double() for wu, u in zip(w, uploads))
        delta = h.layers[module].sparse_delta.dense(v_bar)
        model = h.layers[module].get_base_layer().weight.double() - base[module].double()
        model = h.base_layout(module, model) + h.scaling(module) * sim.global_tensors[k.B].double() @ sim.global_tensors[k.A].double()
        torch.testing.assert_close(model, delta, rtol=1e-4, atol=1e-6)


def test_flower_in_process_round_resume_before_and_after_the_switch_and_export(small_csv, tmp_path):
    from fedlora.app.export import load_global_model
    from fedlora.federation import ClassificationTask
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method="slora", rounds=3, method_options=OPTIONS)
    reference = build(cfg).simulator.run()
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, reference)
    assert [x["slora_stage"] for x in flower] == ["sparse", "switch", "lora"]

    for done in (1, 2):  # a checkpoint in the sparse stage, and one right after the switch
        resume_matches(cfg, tmp_path / f"after{done}", KEYS, reference, after=done)

    for rounds in (1, 3):  # exported in the sparse stage (the delta inside an exact LoRA) and after the switch
        out = tmp_path / f"run{rounds}"
        exp, history = run_experiment(cfg.replace(rounds=rounds, out=str(out)))
        sim = exp.simulator
        model, _, _ = load_global_model(out)
        assert ClassificationTask().evaluate(model, sim.global_test) == pytest.approx(history[-1]["global_accuracy"], abs=1e-9)
        batch = sim.global_test.batch(torch.arange(16))
        batch.pop("labels")
        sim.handle.set(sim.global_state())
        sim.model.eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, sim.model(**batch).logits, rtol=1e-4, atol=1e-5)
        if rounds == 1:
            assert any(sim.global_tensors[n].any() for n in sim.handle.sparse_names())  # there was a delta to export


def test_a_server_optimiser_steps_v_then_the_factors_but_not_the_switch(small_csv):
    cfg = tiny_config(small_csv, method="slora", rounds=3, method_options=OPTIONS)
    plain = build(cfg).simulator.run()
    same = build(cfg.replace(server_opt="avgm", server_lr=1.0, server_momentum=0.0)).simulator.run()  # η = 1, β = 0
    for a, b in zip(same, plain):
        for key in ("divergence", "bytes_up", "bytes_down", "global_accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["round"], key)
    sim = build(cfg.replace(server_opt="adam")).simulator
    h, seen = sim.handle, _spy(sim)
    sim.round(1)
    v = h.sparse_names()[0]
    assert not torch.allclose(sim.global_tensors[v], seen[0][3].broadcast[v])  # v stepped by Adam
    sim.round(2)
    for n in h.B_names() + h.A_names():  # the SVD start is not a step
        assert torch.equal(sim.global_tensors[n], seen[1][3].broadcast[n])
    sim.round(3)
    assert not torch.allclose(sim.global_tensors[h.B_names()[0]], seen[2][3].broadcast[h.B_names()[0]])  # FedIT's factors stepped
