"""LoRA-FAIR and FedRot-LoRA (METHODS.md): their identities against dense float64 references on small shapes (the
d×k matrices are formed here, never in the library), the client-side rotation hook, and 2 rounds × 3 clients end to
end in-process and on the Flower app's in-process round with equal metrics and bytes counted by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_config
from fedlora.aggregation import aggregate, divergence, eckart_young_bound, method_options
from fedlora.aggregation.fedrot import procrustes_rotation, rotate, rotation_side
from fedlora.aggregation.lorafair import DEFAULT_LAM
from fedlora.app.experiment import build
from fedlora.federation import REGISTRY, make_method, parse_method_options
from fedlora.federation.protocol import option_flags

F64 = torch.float64
D = K = 32
R = 4
MODULES = 4
HEAD = 3 * 32 + 3
F32 = 4

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------------------------


def clients(U, d, k, r, seed, drift=None):
    """U clients' factors; ``drift``: all near a common start (B0, A0), as after a few local steps."""
    g = torch.Generator().manual_seed(seed)
    if drift is None:
        Bs = [torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
        As = [torch.randn(r, k, generator=g, dtype=F64) for _ in range(U)]
    else:
        B0, A0 = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
        Bs = [B0 + drift * torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
        As = [A0 + drift * torch.randn(r, k, generator=g, dtype=F64) for _ in range(U)]
    w = torch.rand(U, generator=g, dtype=F64) + 0.1
    return Bs, As, w / w.sum()


def ideal(Bs, As, w):
    return sum(c * B @ A for B, A, c in zip(Bs, As, w.tolist()))


def mean(ts, w):
    return sum(c * t for t, c in zip(ts, w.tolist()))


def random_rotation(r, g):
    Q, T = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(T))  # Haar on O(r)
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def rel_err(dW, approx):
    return float(torch.linalg.matrix_norm(dW - approx) / torch.linalg.matrix_norm(dW))


class NoDenseUpdate(TorchFunctionMode):
    """Fails if any torch call returns a tensor with as many elements as a d×k matrix (the factors are far smaller)."""

    def __init__(self, d, k):
        super().__init__()
        self.limit = d * k

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                raise AssertionError(f"{func} formed a tensor of shape {tuple(t.shape)}")
        return out


# ---- LoRA-FAIR: the math ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(U=st.integers(2, 5), d=st.integers(3, 12), k=st.integers(3, 12), r=st.integers(1, 4), seed=st.integers(0, 10_000),
       drift=st.sampled_from([None, 1e-2, 1e-4]))
def test_lorafair_at_lam_zero_is_the_projection_onto_the_row_space_of_A_bar(U, d, k, r, seed, drift):
    Bs, As, w = clients(U, d, k, r, seed, drift)
    res = aggregate("lorafair", Bs, As, w, lam=0.0)
    dW, B_bar, A_bar = ideal(Bs, As, w), mean(Bs, w), mean(As, w)
    pinv = torch.linalg.pinv(A_bar)  # k×r; P_Ā = Ā⁺Ā projects onto Ā's row space
    torch.testing.assert_close(res.A, A_bar, rtol=1e-12, atol=1e-12)  # A is FedIT's
    # B̄′ = B̄ + ΔB with the minimum-norm ΔB = (ΔW* − B̄Ā)Ā⁺, and so B̄′Ā = ΔW* P_Ā
    torch.testing.assert_close(res.B, B_bar + (dW - B_bar @ A_bar) @ pinv, rtol=1e-8, atol=1e-9)
    scale = float(torch.linalg.matrix_norm(dW))
    torch.testing.assert_close(res.B @ res.A, dW @ pinv @ A_bar, rtol=0, atol=1e-9 * scale)
    rho = divergence(Bs, As, w, res)
    residual = rel_err(dW, dW @ pinv @ A_bar)
    assert rho == pytest.approx(residual, rel=1e-6, abs=1e-10)
    fedit = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    assert rho <= fedit + 1e-12
    assert rho >= eckart_young_bound(Bs, As, w) - 1e-10  # still a rank-r broadcast


def test_lorafair_is_strictly_better_than_fedit_on_a_generic_draw_and_at_the_bound_when_A_is_shared():
    Bs, As, w = clients(4, 9, 7, 3, seed=1)
    rho = divergence(Bs, As, w, aggregate("lorafair", Bs, As, w, lam=0.0))
    fedit = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    assert rho < 0.9 * fedit
    # every client holds the same A: ΔW* = B̄A exactly, FedIT is exact and the correction is zero
    A = As[0]
    res = aggregate("lorafair", Bs, [A] * 4, w, lam=0.0)
    assert res.info["correction_norm"] < 1e-12 and divergence(Bs, [A] * 4, w, res) < 1e-12


@pytest.mark.parametrize("lam", [1e-3, 0.1, 2.0])
def test_lorafair_with_lam_is_the_dense_ridge_solution(lam):
    Bs, As, w = clients(3, 8, 6, 3, seed=2, drift=0.3)
    res = aggregate("lorafair", Bs, As, w, lam=lam)
    dW, B_bar, A_bar = ideal(Bs, As, w), mean(Bs, w), mean(As, w)
    # min_X ‖X Ā − T‖² + λ‖X‖², T = ΔW* − B̄Ā, as an ordinary least-squares problem on the augmented system
    T = dW - B_bar @ A_bar
    r = A_bar.shape[0]
    lhs = torch.cat([A_bar.T, math.sqrt(lam) * torch.eye(r, dtype=F64)], dim=0)  # (k+r)×r
    rhs = torch.cat([T.T, torch.zeros(r, T.shape[0], dtype=F64)], dim=0)
    X = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(res.B, B_bar + X, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(X, T @ A_bar.T @ torch.linalg.inv(A_bar @ A_bar.T + lam * torch.eye(r, dtype=F64)), rtol=1e-10, atol=1e-10)
    rho = divergence(Bs, As, w, res)
    rho0 = divergence(Bs, As, w, aggregate("lorafair", Bs, As, w, lam=0.0))
    fedit = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    assert rho0 <= rho <= fedit  # the penalty costs accuracy, but ΔB = 0 (FedIT) stays feasible
    assert rho > rho0 + 1e-9 or lam < 0.01


def test_lorafair_with_a_rank_deficient_A_bar_uses_the_pseudo_inverse_and_defaults():
    Bs, As, w = clients(2, 7, 6, 3, seed=3)
    w = torch.tensor([0.5, 0.5], dtype=F64)
    As[1][2] = -As[0][2]  # the third row of Ā is zero: rank 2
    res = aggregate("lorafair", Bs, As, w, lam=0.0)
    dW, B_bar, A_bar = ideal(Bs, As, w), mean(Bs, w), mean(As, w)
    pinv = torch.linalg.pinv(A_bar)
    torch.testing.assert_close(res.B, B_bar + (dW - B_bar @ A_bar) @ pinv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.B[:, 2], B_bar[:, 2], rtol=1e-12, atol=1e-12)  # nothing to correct along the null row
    assert method_options("lorafair") == {"lam": DEFAULT_LAM} == {"lam": 1e-3}
    assert aggregate("lorafair", Bs, As, w).info["lam"] == DEFAULT_LAM
    with pytest.raises(ValueError, match="lorafair's ridge strength lam"):
        aggregate("lorafair", Bs, As, w, lam=-1.0)


def test_neither_rule_nor_the_rotation_forms_a_d_by_k_matrix():
    d, k, r = 40, 50, 3
    Bs, As, w = clients(4, d, k, r, seed=4, drift=0.1)
    with NoDenseUpdate(d, k):
        aggregate("lorafair", Bs, As, w, lam=0.0)
        aggregate("lorafair", Bs, As, w)
        aggregate("fedrot", Bs, As, w)
        for side, ref, mine in (("A", As[0], As[1]), ("B", Bs[0], Bs[1])):
            rotate(Bs[1], As[1], procrustes_rotation(ref, mine, side, lam=0.5))
    with pytest.raises(AssertionError, match="formed a tensor"), NoDenseUpdate(d, k):  # the check itself works
        _ = Bs[0] @ As[0]


# ---- FedRot-LoRA: the math -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 10), k=st.integers(2, 10), r=st.integers(1, 5), seed=st.integers(0, 10_000),
       side=st.sampled_from("AB"), lam=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_the_rotation_keeps_each_product_and_is_a_rotation(d, k, r, seed, side, lam):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    ref = torch.randn(*(A.shape if side == "A" else B.shape), generator=g, dtype=F64)
    Rm = procrustes_rotation(ref, A if side == "A" else B, side, lam=lam)
    torch.testing.assert_close(Rm.T @ Rm, torch.eye(r, dtype=F64), rtol=0, atol=1e-12)
    assert float(torch.linalg.det(Rm)) == pytest.approx(1.0, abs=1e-12)
    B2, A2 = rotate(B, A, Rm)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=0, atol=1e-10)
    if lam == 0.0:
        torch.testing.assert_close(Rm, torch.eye(r, dtype=F64), rtol=0, atol=0)


def test_the_hard_rotation_undoes_a_rotation_of_either_factor_in_the_right_orientation():
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(9, 4, generator=g, dtype=F64), torch.randn(4, 7, generator=g, dtype=F64)
    Q = random_rotation(4, g)
    Bu, Au = B @ Q, Q.T @ A  # the same update in rotated coordinates
    for side, ref, mine in (("A", A, Au), ("B", B, Bu)):
        Rm = procrustes_rotation(ref, mine, side)
        torch.testing.assert_close(Rm, Q.T, rtol=0, atol=1e-10)  # not Q: the rotated factor lands on the reference
        B2, A2 = rotate(Bu, Au, Rm)
        torch.testing.assert_close(B2, B, rtol=0, atol=1e-10)
        torch.testing.assert_close(A2, A, rtol=0, atol=1e-10)


def test_the_soft_rotation_at_one_half_is_the_square_root_of_the_hard_one():
    g = torch.Generator().manual_seed(9)
    for side in "AB":
        ref = torch.randn(5, 11, generator=g, dtype=F64) if side == "A" else torch.randn(11, 5, generator=g, dtype=F64)
        Q = random_rotation(5, g)
        mine = (Q @ ref if side == "A" else ref @ Q) + 0.1 * torch.randn(ref.shape, generator=g, dtype=F64)
        hard = procrustes_rotation(ref, mine, side)
        half = procrustes_rotation(ref, mine, side, lam=0.5)
        # (I + R*)/2 = R*^{1/2} cos(angles/2): its nearest rotation is the principal square root of R*
        torch.testing.assert_close(half @ half, hard, rtol=0, atol=1e-10)
        assert (half - torch.eye(5, dtype=F64)).norm() > 0.1


@pytest.mark.parametrize("side", ["A", "B"])
def test_the_rotation_is_the_closest_among_rotations_even_when_a_reflection_would_be_closer(side):
    g = torch.Generator().manual_seed(6)
    r = 4
    for trial in range(6):
        ref = torch.randn(r, 8, generator=g, dtype=F64) if side == "A" else torch.randn(8, r, generator=g, dtype=F64)
        noise = 0.3 * torch.randn(ref.shape, generator=g, dtype=F64)
        P = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=F64))  # a reflection, det −1
        if trial % 2:
            mine = (P @ ref if side == "A" else ref @ P) + noise  # the best orthogonal matrix is nearly P, not a rotation
        else:
            mine = torch.randn(ref.shape, generator=g, dtype=F64)

        def dist(Rm, mine=mine, ref=ref):
            return float(torch.linalg.matrix_norm((Rm.T @ mine if side == "A" else mine @ Rm) - ref))

        Rm = procrustes_rotation(ref, mine, side)
        assert float(torch.linalg.det(Rm)) == pytest.approx(1.0, abs=1e-12)
        best = dist(Rm)
        assert best <= dist(torch.eye(r, dtype=F64)) + 1e-12
        assert best < dist(Rm.T) - 1e-6  # the other orientation is worse
        for _ in range(300):  # and no random rotation, nor a small perturbation of R, does better
            assert best <= dist(random_rotation(r, g)) + 1e-12
            S = torch.randn(r, r, generator=g, dtype=F64)
            assert best <= dist(Rm @ torch.linalg.matrix_exp(1e-3 * (S - S.T))) + 1e-12
        if trial % 2:  # the reflection P itself would be closer, but it is not in SO(r)
            assert dist(P) < best


@pytest.mark.parametrize("side", ["A", "B"])
def test_the_reflection_allowing_alignment_undoes_a_reflection_exactly_where_the_default_cannot(side):
    """A misalignment that is a reflection, B_u = B P, A_u = Pᵀ A (P orthogonal, det −1): the official hard alignment
    over O(r) (``reflect``) lands on the reference exactly, and FedIT of such copies is exact; the default, confined to
    SO(r), stays far off. Both keep each client's product."""
    g = torch.Generator().manual_seed(11)
    d, k, r = 10, 8, 4
    B, A = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    P = random_rotation(r, g) @ torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=F64))
    assert float(torch.linalg.det(P)) == pytest.approx(-1.0)
    Bu, Au = B @ P, P.T @ A
    ref, mine = (A, Au) if side == "A" else (B, Bu)
    hard = procrustes_rotation(ref, mine, side, reflect=True)
    torch.testing.assert_close(hard, P.T, rtol=0, atol=1e-10)
    B2, A2 = rotate(Bu, Au, hard)
    torch.testing.assert_close(B2, B, rtol=0, atol=1e-10)
    torch.testing.assert_close(A2, A, rtol=0, atol=1e-10)
    default = procrustes_rotation(ref, mine, side)
    B3, A3 = rotate(Bu, Au, default)
    assert float(torch.linalg.det(default)) == pytest.approx(1.0, abs=1e-12)
    assert float(torch.linalg.matrix_norm(A3 - A if side == "A" else B3 - B)) > 0.1 * float(torch.linalg.matrix_norm(ref))
    torch.testing.assert_close(B3 @ A3, B @ A, rtol=0, atol=1e-10)
    # FedIT of the aligned copies with an unaligned client (B, A): exact with reflect, not with the default
    w = torch.tensor([0.5, 0.5], dtype=F64)
    assert divergence([B, B2], [A, A2], w, aggregate("fedit", [B, B2], [A, A2], w)) < 1e-10
    assert divergence([B, B3], [A, A3], w, aggregate("fedit", [B, B3], [A, A3], w)) > 1e-3
    with pytest.raises(ValueError, match="the alignment that allows reflections is the hard one, but lam is 0.5"):
        procrustes_rotation(ref, mine, side, lam=0.5, reflect=True)


@pytest.mark.parametrize("side", ["A", "B"])
def test_hard_alignment_of_rotated_copies_makes_fedit_exact(side):
    g = torch.Generator().manual_seed(7)
    d, k, r, U = 10, 8, 4, 4
    B, A = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    Qs = [random_rotation(r, g) for _ in range(U)]
    Bs, As = [B @ Q for Q in Qs], [Q.T @ A for Q in Qs]
    # the reference is a global pair near (B, A), not (B, A) itself: every client rotates by the same extra R0
    B_ref, A_ref = B + 0.2 * torch.randn(d, r, generator=g, dtype=F64), A + 0.2 * torch.randn(r, k, generator=g, dtype=F64)
    before = divergence(Bs, As, w, aggregate("fedit", Bs, As, w))
    aligned = [rotate(Bu, Au, procrustes_rotation(A_ref if side == "A" else B_ref, Au if side == "A" else Bu, side))
               for Bu, Au in zip(Bs, As)]
    Bs2, As2 = [a[0] for a in aligned], [a[1] for a in aligned]
    for Bu, Au, Bv, Av in zip(Bs, As, Bs2, As2):
        torch.testing.assert_close(Bv @ Av, Bu @ Au, rtol=0, atol=1e-10)
    res = aggregate("fedrot", Bs2, As2, w)
    fedit = aggregate("fedit", Bs2, As2, w)  # the server is FedIT
    torch.testing.assert_close(res.B, fedit.B, rtol=0, atol=0)
    torch.testing.assert_close(res.A, fedit.A, rtol=0, atol=0)
    after = divergence(Bs2, As2, w, res)
    assert before > 0.1 and after < 1e-10 and after <= before


def test_rotation_side_alternates_from_round_two_and_bad_input_says_how_to_fix():
    assert [rotation_side(t) for t in range(1, 7)] == [None, "B", "A", "B", "A", "B"]  # METHODS.md
    assert [rotation_side(t, "A") for t in range(1, 5)] == [None, "A", "B", "A"]  # the official code's order
    x = torch.randn(3, 5, dtype=F64)
    with pytest.raises(ValueError, match="side is 'C'"):
        procrustes_rotation(x, x, "C")
    with pytest.raises(ValueError, match=r"lam is 1.5; pass a number in \[0, 1\]"):
        procrustes_rotation(x, x, "A", lam=1.5)
    with pytest.raises(ValueError, match="align factors of one shape"):
        procrustes_rotation(x, x[:, :4], "A")
    torch.testing.assert_close(procrustes_rotation(torch.zeros(3, 5, dtype=F64), x, "A"), torch.eye(3, dtype=F64))  # nothing to align to


# ---- the protocols ---------------------------------------------------------------------------------------------


def test_declarations_and_options():
    fair, rot = REGISTRY["lorafair"], REGISTRY["fedrot"]
    assert (fair.exact, fair.linear, fair.mixed_ranks, fair.personalised) == (False, False, False, False)
    assert (rot.exact, rot.linear, rot.mixed_ranks, rot.personalised) == (False, True, False, False)
    assert fair.adapters() == rot.adapters() == ("lora", "rslora", "dora", "hira")
    assert {"lorafair-lam", "fedrot-lam", "fedrot-first"} <= set(option_flags())
    assert parse_method_options("lorafair", "lorafair-lam=0.01,fedrot-lam=1") == {"lam": 0.01}
    assert parse_method_options("fedrot", "fedrot-lam=1,fedrot-first=A") == {"lam": 1.0, "first": "A"}
    assert make_method("lorafair").rule_options == {"lam": DEFAULT_LAM}
    assert make_method("lorafair", lam=0.0).rule_options == {"lam": 0.0}
    assert make_method("fedrot").settings == {"lam": 0.5, "first": "B", "reflect": False} and make_method("fedrot").rule_options == {}
    assert parse_method_options("fedrot", "fedrot-lam=1,fedrot-reflect=true") == {"lam": 1.0, "reflect": True}
    with pytest.raises(ValueError, match="option reflect=True of method fedrot is the hard alignment, but lam is 0.5; pass fedrot-lam=1"):
        make_method("fedrot", reflect=True)
    with pytest.raises(ValueError, match="option lam=-1.0 of method lorafair must be a finite number ≥ 0"):
        make_method("lorafair", lam=-1.0)
    with pytest.raises(ValueError, match=r"option lam=2.0 of method fedrot must be in \[0, 1\]"):
        make_method("fedrot", lam=2.0)
    with pytest.raises(ValueError, match="method fedrot does not support adapter vera: FedRot-LoRA rotates the rank space"):
        make_method("fedrot", "vera")
    with pytest.raises(ValueError, match="method lorafair does not support adapter vera"):
        make_method("lorafair", "vera")


def test_the_fedrot_upload_hook_rotates_toward_the_start_by_round(small_csv):
    exp = build(tiny_config(small_csv, method="fedrot"))
    h = exp.simulator.handle
    g = torch.Generator().manual_seed(8)
    start = {n: torch.randn(t.shape, generator=g) * 0.3 for n, t in h.get().items()}
    trained = {n: t + 0.2 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    for name, lam, first in (("default", 0.5, "B"), ("hard", 1.0, "B"), ("A first", 0.5, "A")):
        method = make_method("fedrot", lam=lam, first=first)
        assert same(method.upload(h, trained, 2), trained)  # no start: the layout only
        assert same(method.upload(h, trained, 1, start), trained), name  # round 1: nothing to align to
        for rnd in (2, 3):
            side = rotation_side(rnd, first)
            up = method.upload(h, trained, rnd, start)
            assert set(up) == set(trained)
            for n in h.other_names:  # the head travels as trained
                assert up[n] is trained[n]
            for module, k in h.keys.items():
                B, A, B0, A0 = trained[k.B], trained[k.A], start[k.B], start[k.A]
                Rm = procrustes_rotation(A0 if side == "A" else B0, A if side == "A" else B, side, lam=lam)
                Bx, Ax = rotate(B, A, Rm)
                torch.testing.assert_close(up[k.B], Bx, rtol=0, atol=0)
                torch.testing.assert_close(up[k.A], Ax, rtol=0, atol=0)
                assert up[k.B].dtype == torch.float32 and up[k.B].shape == B.shape
                torch.testing.assert_close(up[k.B] @ up[k.A], B @ A, rtol=1e-5, atol=1e-6)  # float32 rounding only
                moved, ref = (up[k.A], A0) if side == "A" else (up[k.B], B0)
                assert (moved - ref).norm() < (A if side == "A" else B).sub(ref).norm(), (name, rnd, module)
                assert (Rm - torch.eye(R, dtype=F64)).norm() > 1e-3  # it did rotate
    assert same(make_method("fedrot", lam=0.0).upload(h, trained, 2, start), trained)  # λ = 0: FedIT's upload


def same(a, b):
    return set(a) == set(b) and all(a[n] is b[n] for n in a)


# ---- end to end: in-process and Flower, bytes by hand -----------------------------------------------------------


def hand_count(adapter):
    """Per client per round, up and down: FedIT's r(d+k) per adapted matrix, the head, DoRA's magnitude vectors."""
    per = MODULES * R * (D + K) + HEAD + (MODULES * D if adapter == "dora" else 0)
    return F32 * per, F32 * per


E2E = [(m, a, "") for m in ("lorafair", "fedrot") for a in ("lora", "rslora", "dora", "hira")] + [
    ("lorafair", "lora", "lorafair-lam=0"), ("fedrot", "lora", "fedrot-lam=1,fedrot-first=A")]


@pytest.mark.parametrize("method,adapter,options", E2E)
def test_two_rounds_three_clients_in_process_and_on_flower(small_csv, tmp_path, method, adapter, options):
    from fedlora.flower.server_app import run_federation
    from test_flower import InlineGrid, assert_same_history

    cfg = tiny_config(small_csv, method=method, adapter=adapter, method_options=options)
    exp = build(cfg)
    sim, h = exp.simulator, exp.simulator.handle
    seen = []
    upload = sim.method.upload

    def spy(h_, tensors, rnd, start=None, **kw):
        out = upload(h_, tensors, rnd, start, **kw)
        if start is not None:
            seen.append((rnd, tensors, start, out))
        return out

    sim.method.upload = spy
    head = h.head_names[0]
    head0 = sim.global_tensors[head].clone()
    history = sim.run()
    up, down = hand_count(adapter)
    for m in history:
        assert m["clients"] == [0, 1, 2] and not m["rejected"]
        assert (m["bytes_up"], m["bytes_down"]) == (3 * up, 3 * down)
        assert math.isfinite(m["divergence"]) and m["divergence"] > 1e-4 and math.isfinite(m["global_accuracy"])
        assert m["bound"] <= m["divergence"] + 1e-6
        if method == "lorafair":  # B̄′ is the best B for Ā (up to the small ridge): below FedIT's ρ on the same uploads
            assert m["divergence"] < m["fedit_divergence"] - 1e-5
        else:  # the server is FedIT on the rotated uploads
            assert m["divergence"] == m["fedit_divergence"]
    assert not torch.equal(sim.global_tensors[head], head0)  # the classifier head trained and was averaged, not left at init
    assert len(seen) == 6 and [s[0] for s in seen] == [1, 1, 1, 2, 2, 2]
    for rnd, trained, start, out in seen:
        for k in h.keys.values():
            if method == "lorafair" or rnd == 1:  # nothing rotates
                assert out[k.B] is trained[k.B] and out[k.A] is trained[k.A]
            else:
                torch.testing.assert_close(out[k.B] @ out[k.A], trained[k.B] @ trained[k.A], rtol=1e-4, atol=1e-6)
                side = rotation_side(rnd, sim.method.settings["first"])
                name = k.A if side == "A" else k.B
                assert (out[name] - start[name]).norm() <= (trained[name] - start[name]).norm() + 1e-6
                assert not torch.equal(out[name], trained[name])
    flower = run_federation(InlineGrid(cfg), cfg.replace(out=str(tmp_path / "flower")))
    assert_same_history(flower, history)
    for key in ("fedit_divergence", "global_accuracy"):
        assert [f[key] for f in flower] == pytest.approx([r[key] for r in history], abs=1e-9)


def test_lorafair_lam_reaches_the_rule_in_a_run(small_csv):
    first = [build(tiny_config(small_csv, method="lorafair", rounds=1, method_options=o)).simulator.run()[0]
             for o in ("lorafair-lam=0", "", "lorafair-lam=1000")]
    exact, default, heavy = first
    # one round from the same seeded start: the uploads, hence FedIT's ρ on them, are identical
    assert exact["fedit_divergence"] == default["fedit_divergence"] == heavy["fedit_divergence"]
    assert exact["divergence"] <= default["divergence"] < heavy["divergence"] <= heavy["fedit_divergence"]
    assert exact["divergence"] < 0.95 * exact["fedit_divergence"]
    assert heavy["divergence"] == pytest.approx(heavy["fedit_divergence"], rel=0.01)  # a huge λ leaves B̄ nearly as FedIT's
