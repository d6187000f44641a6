"""Extreme magnitudes: uploads whose factor products or Grams would overflow are refused with a one-sentence
``ValueError`` before any product or LAPACK call (no NaN ρ, no ``LinAlgError``, no MKL noise on stderr), while
tiny, zero and large-but-safe uploads still aggregate to finite factors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedlora.aggregation import METHODS, Aggregate, aggregate, aggregate_model, divergence, eckart_young_bound

F64 = torch.float64
U, R, D, K = 3, 4, 16, 12
HEADS = 2  # ravan: R = HEADS·(R // HEADS) stacked base columns

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread: these matrices are tiny


def uploads(method, scale, dtype=F64, seed=0):
    """``(Bs, As, w, options)`` that ``method`` accepts, every factor entry of size ~``scale``: the frozen factor
    shared where the rule needs it (ffa/rolora/fedsvd: A; fedsb/ravan: B and A, plus ordinary cores)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    Bs = [rnd(D, R) for _ in range(U)]
    As = [rnd(R, K) for _ in range(U)]
    options = {}
    if method in ("ffa", "rolora", "fedsvd", "loraa2"):
        As = [As[0].clone() for _ in As]
    elif method == "fedsb":
        Bs, As = [Bs[0].clone() for _ in Bs], [As[0].clone() for _ in As]
        options = {"cores": [rnd(R, R).to(dtype) for _ in range(U)]}
    elif method == "ravan":
        Bs, As = [Bs[0].clone() for _ in Bs], [As[0].clone() for _ in As]
        options = {"cores": [rnd(HEADS, R // HEADS, R // HEADS).to(dtype) for _ in range(U)], "heads": HEADS}
    w = torch.rand(U, generator=g, dtype=F64) + 0.2
    # Scale in float64, then cast: the uploads themselves are finite in their dtype.
    return [(B * scale).to(dtype) for B in Bs], [(A * scale).to(dtype) for A in As], w / w.sum(), options


class Ops(TorchDispatchMode):
    """Records the name of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


PRODUCTS = ("mm", "bmm", "matmul", "addmm", "linalg", "cholesky", "eigh", "svd", "qr", "lstsq", "gels", "triangular")
OVERFLOWING = [(F64, 1e150), (torch.float32, 1e20), (torch.bfloat16, 1e20)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("dtype", "scale"), OVERFLOWING, ids=["float64-1e150", "float32-1e20", "bfloat16-1e20"])
def test_every_rule_refuses_uploads_whose_products_overflow(method, dtype, scale, capfd):
    Bs, As, w, options = uploads(method, scale, dtype)
    ops = Ops()
    with ops, pytest.raises(ValueError, match=r"^client \d+'s .*for 'q_proj'.*overflow.*rescale or clip") as exc:
        aggregate(method, Bs, As, w, name="q_proj", **options)
    message = str(exc.value)
    assert "\n" not in message and message.count("; ") == 1  # one sentence: what went wrong; the fix
    assert f"e+{int(math.log10(scale))}" in message  # names the magnitude it saw
    assert not [op for op in ops.names if any(p in op for p in PRODUCTS)]  # refused before any product or LAPACK call
    assert capfd.readouterr().err == ""  # no MKL/LAPACK noise


@pytest.mark.parametrize(("dtype", "scale"), OVERFLOWING, ids=["float64-1e150", "float32-1e20", "bfloat16-1e20"])
@pytest.mark.parametrize("metric", ["divergence", "eckart_young_bound"])
def test_metrics_refuse_uploads_whose_products_overflow(metric, dtype, scale, capfd):
    Bs, As, w, _ = uploads("fedit", scale, dtype)
    ordinary = aggregate("fedit", *uploads("fedit", 1.0, dtype)[:3])  # a result of the right shape and dtype
    call = {"divergence": lambda: divergence(Bs, As, w, ordinary), "eckart_young_bound": lambda: eckart_young_bound(Bs, As, w)}[metric]
    ops = Ops()
    with ops, pytest.raises(ValueError, match=r"^client \d+'s .*overflow.*rescale or clip"):
        call()
    assert not [op for op in ops.names if any(p in op for p in PRODUCTS)]
    assert capfd.readouterr().err == ""


def test_divergence_refuses_a_result_that_would_make_rho_nan(capfd):
    Bs, As, w, _ = uploads("fedit", 1.0)
    res = aggregate("fedit", Bs, As, w)
    huge = Aggregate(method="fedit", B=res.B * 1e160, A=res.A)
    with pytest.raises(ValueError, match=r"^this fedit result's B reaches \|entry\| ~1e160, so the products divergence forms .*overflow"):
        divergence(Bs, As, w, huge)
    nan = Aggregate(method="fedit", B=res.B, A=res.A, base_delta_factors=(res.B, res.A * math.nan))
    with pytest.raises(ValueError, match=r"^this fedit result's residual R contains NaN or Inf"):
        divergence(Bs, As, w, nan)
    assert capfd.readouterr().err == ""


def test_the_message_names_the_client_whose_upload_is_too_large():
    Bs, As, w, _ = uploads("svd", 1.0)
    Bs[2] = Bs[2] * 1e152  # only client 2's B is extreme: products of Grams still overflow float64
    with pytest.raises(ValueError, match=r"^client 2's B reaches \|entry\| = [0-9.]+e\+152, .*overflow"):
        aggregate("svd", Bs, As, w)
    Bs, As, w, _ = uploads("fedit", 1.0, torch.float32)
    Bs[1], As[1] = Bs[1] * 100, As[1] * 1e37  # one float32 client whose own B·A (~1e40) is past float32's range
    with pytest.raises(ValueError, match=r"^client 1's update B·A would overflow float32: .*max\|A\| = [0-9.]+e\+37"):
        aggregate("fedit", Bs, As, w)


def test_scales_count_towards_the_bound():
    Bs, As, w, _ = uploads("fedit", 1.0)
    aggregate("fedit", Bs, As, w, scales=[1e50, 1.0, 1.0])  # s_u·B_u·A_u ~1e50: fine
    with pytest.raises(ValueError, match=r"^client 0's [AB] reaches \|entry\| = .* at scale s_u = 1e\+200, .*overflow"):
        aggregate("fedit", Bs, As, w, scales=[1e200, 1.0, 1.0])


def test_aggregate_model_refuses_it_naming_the_module(capfd):
    Bs, As, w, _ = uploads("florana", 1.0)
    big_B = [b * 1e150 for b in Bs]
    with pytest.raises(ValueError, match=r"^client \d+'s [AB] for 'v_proj' reaches .*overflow.*rescale or clip"):
        aggregate_model("florana", [{"q_proj": b, "v_proj": big} for b, big in zip(Bs, big_B)],
                        [{"q_proj": a, "v_proj": a} for a in As], w)
    res = aggregate_model("florana", [{"q_proj": b} for b in Bs], [{"q_proj": a} for a in As], w)
    with pytest.raises(ValueError, match=r"overflow"):
        res.divergence([{"q_proj": b} for b in big_B], [{"q_proj": a} for a in As], w)
    assert capfd.readouterr().err == ""


def test_a_fedsa_round_without_bs_has_no_product_to_overflow():
    _, As, w, _ = uploads("fedsa", 1e300)
    res = aggregate("fedsa", None, As, w)  # only A is averaged: a convex combination, finite
    assert torch.isfinite(res.A).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("dtype", "scale"), [(F64, 0.0), (F64, 1e-30), (F64, 1e10), (F64, 1e60), (torch.float32, 1e-30), (torch.float32, 1e10)])
def test_tiny_zero_and_large_but_safe_uploads_still_aggregate_finitely(method, dtype, scale, capfd):
    Bs, As, w, options = uploads(method, scale, dtype)
    res = aggregate(method, Bs, As, w, **options)
    for t in (res.B, res.A, res.eval_B, *(res.base_delta_factors or ())):
        assert t is None or torch.isfinite(t).all()
    assert torch.isfinite(res.delta()).all()
    rho = divergence(Bs, As, w, res)
    assert rho == rho and rho >= 0.0  # never NaN (inf only when ΔW* = 0 but ΔŴ ≠ 0)
    bound = eckart_young_bound(Bs, As, w)
    assert math.isfinite(bound)
    if scale != 0.0 and method in ("fedex", "flora", "ffa", "rolora", "fedsvd", "loraa2") and not (dtype == torch.float32 and scale < 1e-20):
        assert rho < (1e-5 if dtype == torch.float32 else 1e-10)  # the exact rules stay exact at any safe scale
    assert capfd.readouterr().err == ""
