"""RAVAN (METHODS.md): h heads s_i B_i H_i A_i on frozen seeded bases; the server averages s_i H_i per head, exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from fedlora.aggregation import aggregate, comm_elements
from fedlora.app.experiment import build
from fedlora.federation import make_method

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def draw(U, d, k, h, r, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(d, h * r, generator=g, dtype=F64), torch.randn(h * r, k, generator=g, dtype=F64)
    Hs = [torch.randn(h, r, r, generator=g, dtype=F64) for _ in range(U)]
    ss = [torch.randn(h, generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.05
    return B, A, Hs, ss, w / w.sum()


def dense(B, A, H, s, r):
    """Σ_i s_i B_i H_i A_i with B_i, A_i the i-th blocks of the stacked bases."""
    return sum(s[i] * B[:, i * r:(i + 1) * r] @ H[i] @ A[i * r:(i + 1) * r] for i in range(H.shape[0]))


@settings(max_examples=40, deadline=None)
@given(U=st.integers(1, 5), heads=st.integers(1, 4), r=st.integers(1, 3), d=st.integers(12, 20), k=st.integers(12, 20),
       seed=st.integers(0, 10**6))
def test_average_of_s_H_per_head_is_exact(U, heads, r, d, k, seed):
    B, A, Hs, ss, w = draw(U, d, k, heads, r, seed)
    res = aggregate("ravan", [B] * U, [A] * U, w, cores=Hs, gains=ss, heads=heads)
    ideal = sum(float(c) * dense(B, A, H, s, r) for c, H, s in zip(w, Hs, ss))
    assert float((res.delta() - ideal).abs().max()) <= 1e-10 * (1 + float(ideal.abs().max()))
    torch.testing.assert_close(res.core, sum(float(c) * H * s[:, None, None] for c, H, s in zip(w, Hs, ss)), rtol=0, atol=1e-12)
    assert res.down_elements() == heads * r * r


def test_averaging_H_and_s_apart_is_not_the_average_update():
    B, A, Hs, ss, w = draw(4, 16, 16, 3, 2, 1)
    apart = dense(B, A, sum(float(c) * H for c, H in zip(w, Hs)), sum(float(c) * s for c, s in zip(w, ss)), 2)
    ideal = sum(float(c) * dense(B, A, H, s, 2) for c, H, s in zip(w, Hs, ss))
    assert float((apart - ideal).norm() / ideal.norm()) > 0.05


def test_bytes_and_bad_input(small_csv):
    assert comm_elements("ravan", 4096, 4096, 8, 10, heads=4) == (4 * 65, 4 * 64)
    B, A, Hs, ss, w = draw(2, 10, 10, 2, 2, 0)
    with pytest.raises(ValueError, match="heads=3"):
        aggregate("ravan", [B] * 2, [A] * 2, w, cores=Hs, heads=3)
    with pytest.raises(ValueError, match="ravan-heads=0"):
        make_method("ravan", "lora", heads=0)
    with pytest.raises(ValueError, match="does not support adapter vera"):
        make_method("ravan", "vera")
    with pytest.raises(ValueError, match="need 80 orthonormal directions but layer .* is 32×32; pass a smaller --rank"):
        build(tiny_config(small_csv, method="ravan", rank=20))


def test_the_layer_and_the_round(small_csv):
    sim = build(tiny_config(small_csv, method="ravan", rank=2, method_options="ravan-heads=3")).simulator
    h = sim.handle
    module, k = next(iter(h.keys.items()))
    layer = h.layers[module]
    B, A = h.parameter(k.B).detach().double(), h.parameter(k.A).detach().double()
    assert B.shape == (32, 6) and A.shape == (6, 32)
    H, s = torch.randn(3, 2, 2), torch.randn(3)
    h.set({k.core: H, k.gain: s})
    x = torch.randn(4, 32)
    want = layer.get_base_layer()(x).double() + h.scaling(module) * x.double() @ dense(B, A, H.double(), s.double(), 2).T
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    h.set(sim.global_tensors)

    history = sim.run()
    assert all(m["divergence"] < 1e-5 for m in history)
    for name in h.gain_names():  # every s_i restarts at 1; the averaged s_i·H_i are the next H_i
        assert torch.equal(sim.global_tensors[name], torch.ones(3))
    assert all(float(sim.global_tensors[n].abs().max()) > 0 for n in h.core_names())


def test_trains_on_minilm_query_value(small_csv):
    sim = build(tiny_config(small_csv, method="ravan", model="minilm", rounds=1, local_steps=1, examples_per_client=16,
                            test_examples=16)).simulator
    h = sim.handle
    assert sorted({m.rsplit(".", 1)[-1] for m in h.layers}) == ["query", "value"] and len(h.layers) == 12
    history = sim.run()
    assert history[0]["divergence"] < 1e-5
    assert all(float(sim.global_tensors[n].abs().max()) > 0 for n in h.core_names())
