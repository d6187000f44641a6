"""Fed-SB (METHODS.md): frozen shared bases, only the r×r core R trained and sent; R̄ = Σ w_u R_u of this round, exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from fedlora.adapters.structures import basis_gain
from fedlora.aggregation import aggregate, comm_bytes, comm_elements, divergence
from fedlora.app.experiment import build
from fedlora.federation import make_method

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def draw(U, d, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    Rs = [torch.randn(r, r, generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.05
    return B, A, Rs, w / w.sum()


@settings(max_examples=40, deadline=None)
@given(U=st.integers(1, 6), d=st.integers(1, 24), k=st.integers(1, 24), r=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_average_of_cores_is_exact(U, d, k, r, seed):
    B, A, Rs, w = draw(U, d, k, r, seed)
    res = aggregate("fedsb", [B] * U, [A] * U, w, cores=Rs)
    ideal = sum(float(c) * B @ R @ A for c, R in zip(w, Rs))
    assert float((res.delta() - ideal).abs().max()) <= 1e-10 * (1 + float(ideal.abs().max()))
    torch.testing.assert_close(res.core, sum(float(c) * R for c, R in zip(w, Rs)), rtol=0, atol=1e-12)
    assert divergence([B @ R for R in Rs], [A] * U, w, res) < 1e-10  # the metrics' view: client factors B·R_u, A
    assert res.down_elements() == r * r and res.frozen_A and res.frozen_B


def test_bytes_are_r_squared_whatever_d_and_k():
    for d, k in ((4096, 1024), (32, 32), (768, 3072)):
        assert comm_elements("fedsb", d, k, 16, 10) == (256, 256)
    assert comm_bytes("fedsb", 4096, 4096, 8, 100).up == 8 * 8 * 4


def test_bad_input_is_one_line():
    B, A, Rs, w = draw(3, 10, 8, 2, 0)
    # Without cores: the clients' factors B·R_u over the shared A, averaged (the same identity).
    res = aggregate("fedsb", [B @ R for R in Rs], [A] * 3, w)
    assert divergence([B @ R for R in Rs], [A] * 3, w, res) < 1e-12
    with pytest.raises(ValueError, match="client 1's A.*differs"):
        aggregate("fedsb", Bs=[B] * 3, As=[A, A + 1, A], weights=w)
    with pytest.raises(ValueError, match="2 cores for 3 clients"):
        aggregate("fedsb", [B] * 3, [A] * 3, w, cores=Rs[:2])
    with pytest.raises(ValueError, match="client 1's B.*differs"):
        aggregate("fedsb", [B, B + 1, B], [A] * 3, w, cores=Rs)
    with pytest.raises(ValueError, match="do not fit bases"):
        aggregate("fedsb", [B] * 3, [A] * 3, w, cores=[torch.zeros(3, 3, dtype=F64)] * 3)
    for adapter in ("dora", "vera", "hira"):
        with pytest.raises(ValueError, match=f"does not support adapter {adapter}.*choose lora or rslora"):
            make_method("fedsb", adapter)


def test_the_layer_is_s_B_R_A_over_seeded_orthonormal_bases(small_csv):
    exp = build(tiny_config(small_csv, method="fedsb", method_options="fedsb-init=random"))
    h = exp.simulator.handle
    module, k = next(iter(h.keys.items()))
    layer = h.layers[module]
    B, A = h.parameter(k.B).detach().double(), h.parameter(k.A).detach().double()
    d, kk = layer.out_features, layer.in_features
    g2 = basis_gain(d, 1, 4) ** 2
    torch.testing.assert_close(B.T @ B, g2 * torch.eye(4, dtype=F64), rtol=0, atol=1e-5)
    torch.testing.assert_close(A @ A.T, g2 * torch.eye(4, dtype=F64), rtol=0, atol=1e-5)
    # The bases are state every client holds, frozen in every round: only the cores and the head train.
    assert set(h.trainable_names) - set(exp.simulator.method.frozen(h, 1)) == set(h.core_names()) | set(h.head_names)
    # Another build (another process, a SuperNode) has the very same bases.
    h2 = build(tiny_config(small_csv, method="fedsb", method_options="fedsb-init=random")).simulator.handle
    assert torch.equal(h.parameter(k.B), h2.parameter(k.B)) and torch.equal(h.parameter(k.A), h2.parameter(k.A))
    # Forward: W0 x + s·B R A x.
    R = torch.randn(1, 4, 4)
    h.set({k.core: R})
    x = torch.randn(5, kk)
    W0 = layer.get_base_layer()
    want = W0(x).double() + h.scaling(module) * x.double() @ (B @ R[0].double() @ A).T
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_gradient_init_is_the_svd_of_the_clients_mean_gradient_and_its_bytes_go_in_round_one(small_csv):
    cfg = tiny_config(small_csv, method="fedsb", rounds=2)
    sim = build(cfg).simulator
    h, method = sim.handle, sim.method
    assert method.needs_setup() and not build(tiny_config(small_csv, method="fedsb", method_options="fedsb-init=random")).simulator.method.needs_setup()
    grads = []
    for c in sim.clients:  # each client's estimate, from the initial state
        h.set(sim.global_tensors)
        grads.append(method.setup_upload(h, sim.task, c.train, sim.config))
    h.set(sim.global_tensors)
    w = torch.tensor([len(c.train) for c in sim.clients], dtype=F64)
    w = w / w.sum()
    history = sim.run()
    for module, k in h.keys.items():
        G = sum(float(c) * g[f"{module}.grad"].double() for c, g in zip(w, grads))
        U, S, Vh = torch.linalg.svd(G)
        assert float(S[0]) > 0
        B, A = sim.global_tensors[k.B].double(), sim.global_tensors[k.A].double()
        g2 = basis_gain(G.shape[0], 1, 4) ** 2
        # B spans the top-4 left singular vectors of the mean gradient, A the right ones (up to sign), times γ.
        torch.testing.assert_close((U[:, :4].T @ B).abs(), g2 ** 0.5 * torch.eye(4, dtype=F64), rtol=0, atol=1e-4)
        torch.testing.assert_close((Vh[:4] @ A.T).abs(), g2 ** 0.5 * torch.eye(4, dtype=F64), rtol=0, atol=1e-4)
    # Round 1's row carries round 0: d·k up and r(d+k) down per matrix and client, on top of the cores and heads.
    dk, rdk, core, head = 4 * 32 * 32, 4 * 4 * 64, 4 * 16, 3 * 32 + 3
    assert history[0]["bytes_up"] == 3 * 4 * (dk + core + head) and history[0]["bytes_down"] == 3 * 4 * (rdk + core + head)
    assert history[1]["bytes_up"] == history[1]["bytes_down"] == 3 * 4 * (core + head)
    assert all(m["divergence"] < 1e-5 for m in history)


def test_server_takes_this_rounds_cores_only_and_round_one_trains(small_csv):
    sim = build(tiny_config(small_csv, method="fedsb", rounds=3)).simulator
    h, seen = sim.handle, []
    inner = sim.method.aggregate

    def spy(h_, uploads, weights, current, ctx):
        update = inner(h_, uploads, weights, current, ctx)
        seen.append((uploads, weights, update))
        return update

    sim.method.aggregate = spy
    head0 = {n: sim.global_tensors[n].clone() for n in h.head_names}
    sim.run()
    for uploads, weights, update in seen:
        assert set(uploads[0]) == set(h.core_names()) | set(h.head_names)  # no basis travels in a round
        assert not set(update.broadcast) & (set(h.B_names()) | set(h.A_names()))
        for name in h.core_names():
            want = sum(float(w) * u[name] for w, u in zip(weights, uploads))
            torch.testing.assert_close(update.broadcast[name], want, rtol=0, atol=1e-7)
    first = seen[0][2].broadcast
    assert all(float(first[n].abs().max()) > 0 for n in h.core_names())  # R = 0 at start still trains in round 1
    assert all(not torch.equal(sim.global_tensors[n], head0[n]) for n in h.head_names)  # the head is averaged, not frozen
    assert all(m["divergence"] < 1e-5 for m in sim.history)


def test_export_reloads_the_global_model(small_csv, tmp_path):
    from fedlora.app.experiment import run_experiment
    from fedlora.app.export import load_global_model

    exp, history = run_experiment(tiny_config(small_csv, method="fedsb", rounds=1, out=str(tmp_path / "run")))
    model, _, _ = load_global_model(tmp_path / "run")
    sim = exp.simulator
    sim.handle.set(sim.global_state())
    batch = sim.global_test.batch(torch.arange(8))
    labels = batch.pop("labels")
    model.eval(), sim.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, sim.model(**batch).logits, rtol=1e-4, atol=1e-4)
    assert labels.shape[0] == 8
