"""Mixed ranks in the math layer: FlexLoRA, HetLoRA, segment averaging, FLoRA, scales, and ρ without an upper bound.

Every check is against a dense reference on small shapes (d×k matrices formed here, never in the library)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import aggregate, comm_elements, divergence, eckart_young_bound

F64 = torch.float64


def clients(ranks, d=7, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=F64) for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=F64) + 0.1
    return Bs, As, w / w.sum()


def ideal(Bs, As, w, s):
    return sum(wu * su * B @ A for B, A, wu, su in zip(Bs, As, w.tolist(), s))


def truncated(M, r):
    U, S, Vh = torch.linalg.svd(M)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_flexlora_gives_each_client_the_truncated_svd_at_its_own_rank():
    ranks, alpha = [2, 4, 3], 8.0
    s = [alpha / r for r in ranks]
    Bs, As, w = clients(ranks, d=9, k=6, seed=1)
    res = aggregate("flexlora", Bs, As, w, scales=s)
    dW = ideal(Bs, As, w, s)
    assert res.B.shape == (9, 4) and res.A.shape == (4, 6)
    torch.testing.assert_close(res.B @ res.A, truncated(dW, 4), rtol=1e-9, atol=1e-9)  # the global model: [ΔW*]_{r_max}
    for u, (B, A) in enumerate(res.clients):
        assert B.shape == (9, ranks[u]) and A.shape == (ranks[u], 6)
        torch.testing.assert_close(s[u] * B @ A, truncated(dW, ranks[u]), rtol=1e-9, atol=1e-9)
    # Eckart–Young at r_max: ρ equals the bound
    assert divergence(Bs, As, w, res, scales=s) == pytest.approx(eckart_young_bound(Bs, As, w, scales=s), rel=1e-7)


def test_flexlora_with_equal_ranks_is_svd():
    Bs, As, w = clients([3, 3, 3, 3], d=8, k=6, seed=2)
    a, b = aggregate("flexlora", Bs, As, w), aggregate("svd", Bs, As, w)
    torch.testing.assert_close(a.B @ a.A, b.B @ b.A, rtol=1e-12, atol=1e-12)
    assert a.clients is None  # one rank, no scales: every client receives B, A


def test_hetlora_pads_weights_by_product_norm_and_truncates_by_hand():
    # d = 2, k = 2; client 0 rank 1, client 1 rank 2; scales 1 (so the scaled factors are the factors)
    B0, A0 = torch.tensor([[1.0], [0.0]], dtype=F64), torch.tensor([[2.0, 0.0]], dtype=F64)  # ‖B0A0‖ = 2
    B1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    A1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)  # B1A1 = diag(1, 6): ‖·‖ = √37
    w = torch.tensor([0.5, 0.5], dtype=F64)
    res = aggregate("hetlora", [B0, B1], [A0, A1], w)
    n0, n1 = 2.0, math.sqrt(37.0)
    om = torch.tensor([n0, n1], dtype=F64) / (n0 + n1)
    torch.testing.assert_close(res.info["weights"], om)
    pad_B0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)  # zero-padded, NOT renormalised per segment
    pad_A0 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(res.B, om[0] * pad_B0 + om[1] * B1)
    torch.testing.assert_close(res.A, om[0] * pad_A0 + om[1] * A1)
    (cB0, cA0), (cB1, cA1) = res.clients  # client 0 receives the first component only
    torch.testing.assert_close(cB0, res.B[:, :1])
    torch.testing.assert_close(cA0, res.A[:1])
    torch.testing.assert_close(cB1 @ cA1, res.B @ res.A)
    # with scales: each client's factors carry √s_u, and client u gets the result back over √s_u
    s = [4.0, 1.0]
    scaled = aggregate("hetlora", [B0, B1], [A0, A1], w, scales=s)
    om_s = torch.tensor([4 * n0, n1], dtype=F64) / (4 * n0 + n1)
    torch.testing.assert_close(scaled.info["weights"], om_s)
    torch.testing.assert_close(scaled.B, om_s[0] * 2 * pad_B0 + om_s[1] * B1)
    torch.testing.assert_close(scaled.clients[0][0], scaled.B[:, :1] / 2)


def test_hetlora_data_weights_are_segment_averaging():
    Bs, As, w = clients([1, 2, 3], seed=3)
    res = aggregate("hetlora", Bs, As, w, weighting="data")
    fed = aggregate("fedit", Bs, As, w)
    torch.testing.assert_close(res.B, fed.B)
    torch.testing.assert_close(res.A, fed.A)
    with pytest.raises(ValueError, match="unknown HetLoRA weighting 'norm'; choose sparsity"):
        aggregate("hetlora", Bs, As, w, weighting="norm")


def test_segment_averaging_uses_only_the_clients_that_have_the_segment():
    ranks = [1, 2, 4]
    Bs, As, w = clients(ranks, seed=4)
    res = aggregate("fedit", Bs, As, w)
    assert res.B.shape[1] == 4 and res.p is None
    for j in range(4):
        have = [u for u, r in enumerate(ranks) if r > j]
        ww = w[have] / w[have].sum()
        torch.testing.assert_close(res.B[:, j], sum(c * Bs[u][:, j] for c, u in zip(ww.tolist(), have)))
        torch.testing.assert_close(res.A[j], sum(c * As[u][j] for c, u in zip(ww.tolist(), have)))
    # component 3 only client 2 has: it is client 2's own, undiluted by padded zeros
    torch.testing.assert_close(res.B[:, 3], Bs[2][:, 3])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(0, 10_000))
def test_segment_averaging_matches_a_brute_force_mean(ranks, seed):
    Bs, As, w = clients(ranks, d=4, k=3, seed=seed)
    res = aggregate("fedsa", Bs, As, w)  # A by segment averaging, eval B the same way
    R = max(ranks)
    for j in range(R):
        num = sum(w[u] * As[u][j] for u in range(len(ranks)) if ranks[u] > j)
        den = sum(w[u] for u in range(len(ranks)) if ranks[u] > j)
        torch.testing.assert_close(res.A[j], num / den)
        torch.testing.assert_close(res.eval_B[:, j], sum(w[u] * Bs[u][:, j] for u in range(len(ranks)) if ranks[u] > j) / den)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 10_000), st.sampled_from(["lora", "rslora"]))
def test_flora_with_mixed_ranks_and_scales_is_exact(ranks, seed, kind):
    alpha = 16.0
    s = [alpha / (r if kind == "lora" else math.sqrt(r)) for r in ranks]
    Bs, As, w = clients(ranks, seed=seed)
    res = aggregate("flora", Bs, As, w, scales=s)
    assert res.clients is None and res.B.shape[1] == sum(ranks)  # one stack for everyone
    torch.testing.assert_close(res.B @ res.A, ideal(Bs, As, w, s), rtol=1e-10, atol=1e-10)
    assert divergence(Bs, As, w, res, scales=s) < 1e-10


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(0, 10_000))
def test_flexlora_matches_the_dense_svd_for_any_ranks(ranks, seed):
    s = [8.0 / r for r in ranks]
    Bs, As, w = clients(ranks, d=6, k=5, seed=seed)
    res = aggregate("flexlora", Bs, As, w, scales=s)
    dW = ideal(Bs, As, w, s)
    for u, (B, A) in enumerate(res.clients):
        torch.testing.assert_close(s[u] * B @ A, truncated(dW, ranks[u]), rtol=1e-7, atol=1e-8 * float(dW.norm()))


def test_divergence_is_not_bounded_by_one():
    """Opposed clients: B₂ = 3B₁, A₂ = −A₁/3 (+ noise). ΔW* nearly cancels while FedIT's product does not."""
    g = torch.Generator().manual_seed(0)
    B1, A1 = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)
    B2 = 3 * B1 + 0.1 * torch.randn(6, 2, generator=g, dtype=F64)
    A2 = -A1 / 3 + 0.1 * torch.randn(2, 5, generator=g, dtype=F64)
    w = torch.tensor([0.5, 0.5], dtype=F64)
    res = aggregate("fedit", [B1, B2], [A1, A2], w)
    dW = 0.5 * B1 @ A1 + 0.5 * B2 @ A2
    dense = float(torch.linalg.matrix_norm(dW - res.B @ res.A) / torch.linalg.matrix_norm(dW))
    rho = divergence([B1, B2], [A1, A2], w, res)
    assert rho == pytest.approx(dense, rel=1e-10)
    assert rho > 1.0


def test_scales_validation_and_rules_without_mixed_ranks_say_which_can():
    Bs, As, w = clients([2, 3], seed=5)
    with pytest.raises(ValueError, match=r"svd cannot combine clients of different ranks: use one of .*flexlora"):
        aggregate("svd", Bs, As, w)
    with pytest.raises(ValueError, match="scales has 1 entries but there are 2 clients"):
        aggregate("fedit", Bs, As, w, scales=[1.0])
    with pytest.raises(ValueError, match="must be finite and positive"):
        aggregate("fedit", Bs, As, w, scales=[1.0, 0.0])


def test_declared_bytes_per_client_at_its_own_rank():
    d, k = 32, 24
    for r in (4, 8, 16):
        assert comm_elements("flexlora", d, k, r, 3) == (r * (d + k), r * (d + k))
        assert comm_elements("hetlora", d, k, r, 3) == (r * (d + k), r * (d + k))
        assert comm_elements("flora", d, k, r, 3) == (r * (d + k), 3 * r * (d + k))
