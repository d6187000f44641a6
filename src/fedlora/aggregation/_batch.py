"""Server aggregation batched over clients: the stacked uploads, and when the rules use them.

A rule that loops over clients launches a handful of kernels per client, and a solver that reads a scalar back
(``.item()``, ``float(t)``, ``bool(t)``) each iteration waits for the device each time; on a GPU both dominate
(issue 30: at U = 1000 on an H100 FedIT took 4.6× the dense formation of ΔW*). The batched forms here work on
one stacked tensor per side, ``(U, d, R)`` and ``(U, R, k)``, with one product over the stack.

Mixed ranks: every client's factor is zero-padded to the largest rank R (``stack_padded``): its padded columns
of B and rows of A are zero, so they change no product ``B_u A_u``, no Gram ``B_uᵀB_u``·``A_uA_uᵀ`` trace and no
weighted sum of the real components. Each distinct rank is stacked in one copy (group by rank, then one indexed
write into the padded stack), so the number of kernels grows with the number of distinct ranks, not of clients.

``batch_mode`` (our choice; tests and the benchmark set it, nothing else should):

* ``"auto"`` (the default): batched for uploads on an accelerator; today's per-client code for uploads on the
  CPU. There a host read of a CPU tensor waits for nothing, stacking copies every upload once (for the weighted
  sums the copy costs more than the sum: 4096×8 float32 factors, U = 100, 0.57 ms in place against 1.8 ms
  stacked, 2 cores), and the batched solvers' masked iterations after the stop are pure waste; measured in the
  same run, the batched code is no faster there (``benchmarks/bench_aggregation.py --batched``, docs/aggregation.md).
* ``"on"``: the batched code on any device (the equality tests, and the benchmark's "batched" column).
* ``"off"``: today's per-client code on any device (the ``_reference_*`` functions: the equality tests' reference
  and the benchmark's "per-client" column).

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

BATCH_MODES = ("auto", "on", "off")
# Iterations between two host reads of a batched solver's convergence flag. Each read costs a device round trip
# (~10-50 µs on a GPU, plus the idle pipeline behind it); a check every 4 iterations wastes at most 3 masked
# iterations. Our choice; the results do not depend on it (frozen state after the stop, see the solvers).
CHECK_EVERY = 4

_mode = "auto"


@contextmanager
def batch_mode(mode: str) -> Iterator[None]:
    """Run the rules batched (``"on"``), per client as before (``"off"``) or as the device suits (``"auto"``)."""
    global _mode
    if mode not in BATCH_MODES:
        raise ValueError(f"batch mode is {mode!r}; pass one of {', '.join(map(repr, BATCH_MODES))}")
    before, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = before


def batched(device: torch.device) -> bool:
    """Whether the rules run batched for uploads on ``device``: ``"on"`` always, ``"off"`` never, ``"auto"`` off the
    CPU (see the module docstring)."""
    return _mode == "on" or (_mode == "auto" and device.type != "cpu")


def check_every() -> int:
    """Solver iterations between two host reads of the convergence flag in the batched solvers."""
    return CHECK_EVERY


def stack_padded(tensors: Sequence[Tensor], dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``(U, *shape)`` stack with the rank axis ``dim`` (of each tensor) zero-padded to the largest rank, in
    ``dtype`` (default: the tensors'). Equal ranks: one ``torch.stack``; mixed: one stack per distinct rank."""
    dtype = dtype or tensors[0].dtype
    ranks = [t.shape[dim] for t in tensors]
    if len(set(ranks)) == 1:
        return torch.stack(list(tensors)).to(dtype)
    shape = list(tensors[0].shape)
    shape[dim] = max(ranks)
    out = tensors[0].new_zeros((len(tensors), *shape), dtype=dtype)
    groups: dict[int, list[int]] = {}
    for u, r in enumerate(ranks):
        groups.setdefault(r, []).append(u)
    for r, members in groups.items():
        idx = torch.tensor(members, device=out.device)
        out.narrow(dim + 1, 0, r).index_copy_(0, idx, torch.stack([tensors[u] for u in members]).to(dtype))
    return out


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and the half types compute in float32 (as ``add_(t, alpha=c)`` does)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stacked_sum(stacked: Tensor, coeffs: Tensor) -> Tensor:
    """``Σ_u c_u S[u]`` over a ``(U, …)`` stack: one GEMV, in float32 for half-precision stacks (the coefficients
    never rounded to bfloat16), returned in the stack's dtype and device."""
    ct = _opmath(stacked.dtype)
    flat = stacked.reshape(stacked.shape[0], -1).to(ct)
    return (coeffs.to(stacked.device, ct) @ flat).view(stacked.shape[1:]).to(stacked.dtype)


def segment_coefficients(ranks: Sequence[int], w: Tensor) -> Tensor:
    """U×R coefficients of segment averaging: component j over the clients whose rank exceeds j, renormalised."""
    R = max(ranks)
    has = torch.tensor([[j < r for j in range(R)] for r in ranks], dtype=torch.float64)
    mass = (w[:, None] * has).sum(0)
    return torch.where(mass > 0, w[:, None] * has / torch.where(mass > 0, mass, 1.0), 0.0)


def stacked_segment_sum(stacked: Tensor, coef: Tensor, dim: int) -> Tensor:
    """``Σ_u coef[u, j]·S[u]`` with component j along ``dim`` (0 or 1) of each 2-D entry: one einsum."""
    ct = _opmath(stacked.dtype)
    out = torch.einsum("uj,ujk->jk" if dim == 0 else "uj,uij->ij", coef.to(stacked.device, ct), stacked.to(ct))
    return out.to(stacked.dtype)


def scale_each(tensors: Sequence[Tensor], coeffs: Tensor, dim: int) -> list[Tensor]:
    """``[c_u·T_u]`` as one broadcast product per distinct rank (``dim`` is the rank axis), in the tensors' dtype,
    computed at the precision ``T_u * c_u`` with a Python number uses (float32 for half types); views of the
    products, one stack per rank group."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[int, list[int]] = {}
    for u, t in enumerate(tensors):
        groups.setdefault(t.shape[dim], []).append(u)
    for members in groups.values():
        st = torch.stack([tensors[u] for u in members])
        c = coeffs[members].to(st.device, _opmath(st.dtype)).view(-1, *([1] * (st.dim() - 1)))
        for u, t in zip(members, (st * c).to(st.dtype).unbind(0)):
            out[u] = t
    return out  # type: ignore[return-value]


def truncate_each(B: Tensor | None, A: Tensor | None, ranks: Sequence[int], roots: Tensor) -> list[tuple[Tensor | None, Tensor | None]]:
    """``[(B[:, :r_u] / c_u, A[:r_u] / c_u)]`` as one broadcast division per distinct rank."""
    out: list[tuple[Tensor | None, Tensor | None]] = [(None, None)] * len(ranks)
    groups: dict[int, list[int]] = {}
    for u, r in enumerate(ranks):
        groups.setdefault(r, []).append(u)
    for r, members in groups.items():
        parts = []
        for t in (None if B is None else B[:, :r], None if A is None else A[:r]):
            if t is None:
                parts.append([None] * len(members))
                continue
            c = roots[members].to(t.device, _opmath(t.dtype)).view(-1, 1, 1)
            parts.append(list((t.unsqueeze(0) / c).to(t.dtype).unbind(0)))
        for u, b, a in zip(members, *parts):
            out[u] = (b, a)
    return out
