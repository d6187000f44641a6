"""Every rule is device-agnostic: uploads on a device give results on that device, equal to the CPU's.

Runs on the CPU everywhere (the device is then the CPU itself, which still checks that nothing assumes the
uploads' device); with a CUDA device present (``torch.cuda.is_available()``) the same checks run there too.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import METHODS, aggregate, divergence, eckart_young_bound
from test_aggregation import SHARED_A

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.usefixtures("one_thread")


def uploads(method, U=6, r=4, d=40, k=32, seed=0, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    B0, A0 = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    Bs = [B0 + 0.3 * torch.randn(d, r, generator=g, dtype=F64) for _ in range(U)]
    As = [A0 + 0.3 * torch.randn(r, k, generator=g, dtype=F64) for _ in range(U)]
    if method in SHARED_A:
        As = [As[0]] * U
    w = torch.rand(U, generator=g, dtype=F64) + 0.1
    move = lambda ts: [t.to(device, dtype) for t in ts]  # noqa: E731
    return move(Bs), move(As), w / w.sum()


def tensors(res):
    out = {"B": res.B, "A": res.A, "eval_B": res.eval_B}
    if res.base_delta_factors is not None:
        out["L"], out["R"] = res.base_delta_factors
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_rule_runs_where_its_uploads_are_and_agrees_with_the_cpu(method, device):
    Bs, As, w = uploads(method, device=device)
    res = aggregate(method, Bs, As, w)  # fedsa: the Bs only for eval_B
    for name, t in tensors(res).items():
        assert t.device.type == device, f"{method}: {name} came back on {t.device}"
        assert t.dtype == F64
    ref = aggregate(method, *uploads(method))
    # Compare products, not factors: an SVD's singular vectors are defined up to sign.
    got, want = res.delta().cpu(), ref.delta()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()) + 1e-12), method


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_large_u_paths_run_on_the_device(device, dtype):
    Bs, As, w = uploads("svd", U=80, device=device, dtype=dtype)
    svd = aggregate("svd", Bs, As, w)
    assert svd.info["solver"] == "randomized" and svd.B.device.type == device and svd.B.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-12
    assert divergence(Bs, As, w, svd) <= 1.01 * eckart_young_bound(Bs, As, w) + floor
    florana = aggregate("florana", Bs, As, w)
    assert florana.info["solver"] == "iterative" and florana.B.device.type == device and florana.B.dtype == dtype
    exact = aggregate("florana", Bs, As, w, solver="exact")
    assert divergence(Bs, As, w, florana) ** 2 <= divergence(Bs, As, w, exact) ** 2 * (1 + 1e-3)
