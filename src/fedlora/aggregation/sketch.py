"""The ideal update as an implicit operator, and a randomized truncated SVD of it that is linear in the clients.

``ΔW* = Σ_u w_u B_u A_u = B_cat W A_cat`` is never formed: ``Ideal`` multiplies by it through the stacked factors,
``ΔW* x = B_cat (W (A_cat x))`` and ``ΔW*ᵀ y = A_catᵀ (W (B_catᵀ y))``, each O((d+k)·n·m) for n = Σ r_u stacked
columns and m right-hand sides. The Gram-space rules cost O((d+k)·n²): quadratic in the number of clients U. This
module's ``randomized_svd`` costs O((d+k)·n·ℓ) per product with ℓ = r + oversampling, a handful of products in all.

``randomized_svd`` is Halko, Martinsson & Tropp's randomized range finder with subspace (power) iterations
(SIAM Review 53(2), 2011, Algorithms 4.4 and 5.1), with an a-posteriori stopping rule tied to what the caller
asked for: ρ = ‖ΔW* − B̂Â‖/‖ΔW*‖ within ``tol`` of the Eckart–Young bound ρ_min, i.e. ``ρ ≤ (1 + tol)·ρ_min``.
Write σ̃_i for the singular values of ``ΔW* Q_z`` (``Q_z`` orthonormal; each is at most σ_i). The approximation
``Q [QᵀΔW*]_r`` misses ``e² = ‖ΔW*‖² − Σ_{i≤r} σ̂_i²`` with σ̂ from ``QᵀΔW*``, and the bound is
``e_min² = ‖ΔW*‖² − Σ_{i≤r} σ_i²``, so ``e² − e_min² = Σ_{i≤r} (σ_i² − σ̂_i²)``: the energy the top r directions
still lack. Each power iteration raises ``Σ_{i≤r} σ̃_i²`` by δ; subspace iteration converges geometrically, so
the remaining deficit is about δ·c/(1−c) for the observed contraction c = δ/δ_prev. ``e²`` itself is estimated
from the in-sketch tail ``Σ_{r<i≤ℓ} σ̃_i²`` plus the energy outside the sketch, ``‖(I − QQᵀ)ΔW* Ω_t‖²/m`` on
m independent Gaussian test vectors (an unbiased estimate of ``‖(I − QQᵀ)ΔW*‖_F²``). Iteration stops when the
deficit estimate is below ``(1 − (1+tol)⁻²)/2`` of ``e²`` (a factor two of safety). The tolerance is checked
against the exact bound in the tests and ``benchmarks/bench_aggregation.py --scale``, never assumed.

Precision: the products run in the uploads' dtype (float32 uploads: float32 GEMMs, 4.5× faster than float64 on
this CPU, and no float64 copy of the uploads), the small QRs and SVDs in float64. The projection ``QᵀΔW*`` is
insensitive to first order to rounding in ``Q``, so the floor this sets is the float32 rounding of the product
itself: ρ reads about 1e-6 too high in float32, which matters only when ρ_min is below ~1e-4 (measured:
docs/aggregation.md). float64 uploads get float64 products throughout.

Device: everything stays on the uploads' device (CUDA included), with a seeded generator there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._batch import batched, check_every
from ._common import weights_per_column

__all__ = ["Ideal", "RandomizedSVD", "compute_dtype", "randomized_svd"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 uploads stay float64; float32, bfloat16 and float16 uploads compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class Ideal:
    """``ΔW* = B W A`` held as its stacked factors: ``B`` d×n, ``A`` n×k in the compute dtype, ``wcol`` the n
    per-column weights (the diagonal of W) in that dtype, all on the uploads' device."""

    B: Tensor
    A: Tensor
    wcol: Tensor

    @classmethod
    def stack(cls, Bs: Sequence[Tensor], As: Sequence[Tensor], w: Tensor) -> Ideal:
        dtype = compute_dtype(Bs[0].dtype)
        B = torch.cat(list(Bs), dim=1).to(dtype)  # one copy of the uploads each, no float64 copy for float32
        A = torch.cat(list(As), dim=0).to(dtype)
        wcol = weights_per_column(w, [b.shape[1] for b in Bs]).to(B.device, dtype)
        return cls(B=B, A=A, wcol=wcol)

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    @property
    def n(self) -> int:
        return self.B.shape[1]

    def mm(self, x: Tensor) -> Tensor:
        """``ΔW* x`` for x k×m. O((d+k)·n·m)."""
        return self.B @ (self.wcol[:, None] * (self.A @ x.to(self.A.dtype)))

    def rmm(self, y: Tensor) -> Tensor:
        """``ΔW*ᵀ y`` for y d×m. O((d+k)·n·m)."""
        return self.A.T @ (self.wcol[:, None] * (self.B.T @ y.to(self.B.dtype)))


@dataclass(frozen=True, eq=False)
class RandomizedSVD:
    """Top singular triplets of ΔW*: ``U`` d×c, ``S`` (c,), ``Vh`` c×k, float64, with c ≤ ℓ columns computed."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    power_iterations: int
    converged: bool
    sketch: int  # ℓ
    residual_sq: float  # estimated ‖ΔW* − [QQᵀΔW*]_r‖², the error of the rank-r result


def _orth(y: Tensor) -> Tensor:
    """Orthonormal basis of y's columns (d×ℓ: cheap), in y's dtype."""
    return torch.linalg.qr(y)[0]


def randomized_svd(op: Ideal, rank: int, *, tol: float = 0.01, oversample: int | None = None, max_power: int = 12,
                   seed: int = 0, test_vectors: int = 8) -> RandomizedSVD:
    """Randomized SVD of the implicit ``op`` good for its top ``rank`` triplets: ρ ≤ (1 + tol)·ρ_min, estimated.

    ``oversample`` defaults to 10 extra columns (ℓ = rank + oversample, capped at n, d and k: at the cap
    the sketch spans ΔW*'s whole range and the result is exact without power iterations). Cost: 2 + 2q products
    with ΔW* of width ℓ for q power iterations (q = 1 when the spectrum has a clear gap after rank r), QRs of d×ℓ
    and k×ℓ matrices, and ℓ×ℓ eigensolves.

    Each half-step of subspace iteration (``Y = ΔW* Q_z``, then ``M = QᵀΔW*`` with Q = orth(Y)) can only raise the
    top-r energy; the raise δ of the last ``M`` half-step, times c/(1−c) for the per-half-step contraction c
    (the larger of the spectral rate (σ̂_ℓ/σ̂_r)² and the observed rate), estimates what the top r still lack.
    At least one power iteration runs (four products in all) unless the sketch spans the range.

    Host synchronisation (the batched path, ``_batch.batched``: uploads on an accelerator): the stopping rule is
    evaluated on the device, as tensors; the host reads the "done" flag only every ``_batch.CHECK_EVERY`` (4)
    iterations. An iteration after "done" still runs but its result is discarded (``torch.where`` keeps the state
    of the iteration that stopped), so the result is the same whatever the interval, and equal to today's loop
    (``_reference_randomized_svd``), which runs for uploads on the CPU. On CUDA, ``torch.linalg.eigh``,
    ``svdvals`` and ``qr`` of the small ℓ×ℓ and d×ℓ problems still check their LAPACK status on the host.
    """
    if not batched(op.B.device):
        return _reference_randomized_svd(op, rank, tol=tol, oversample=oversample, max_power=max_power, seed=seed,
                                         test_vectors=test_vectors)
    ell, full, m, Y, Yt, target = _sketch_start(op, rank, tol=tol, oversample=oversample, seed=seed, test_vectors=test_vectors)
    dtype, every = op.B.dtype, check_every()
    st = _SketchState.start(op.B.device)
    for it in range(max_power + 1):
        st = st.advance(_sketch_step(op, Y, Yt, rank, m), it, full=full, target=target, last=it >= max_power)
        if (it + 1) % every == 0 or it >= max_power:
            if bool(st.done):  # the only host read: every ``every`` iterations
                break
        Y = op.mm(_orth(st.M.T.to(dtype)))  # ΔW* Q_z with Q_z = orth((QᵀΔW*)ᵀ) = orth(ΔW*ᵀQ)
    return st.result(rank, ell)


def _sketch_step(op: Ideal, Y: Tensor, Yt: Tensor, rank: int, m: int) -> dict[str, Tensor]:
    """One half-step pair from ``Y``: Q, M = QᵀΔW*, its eigenpairs and the stopping rule's inputs, as tensors."""
    Q, R = torch.linalg.qr(Y.to(torch.float64))
    energy_y = torch.linalg.svdvals(R).square()[:rank].sum()
    M = (((Q.T.to(op.B.dtype) @ op.B) * op.wcol) @ op.A).to(torch.float64)  # QᵀΔW* = (QᵀB) W A, ℓ×k
    lam, Um = torch.linalg.eigh(M @ M.T)  # ℓ×ℓ: the squares of M's singular values, ascending
    lam, Um = lam.flip(0).clamp_min(0.0), Um.flip(1)
    outside = (Yt - Q @ (Q.T @ Yt)).square().sum() / m if m else torch.zeros((), dtype=torch.float64, device=Q.device)
    top, tail = lam[:rank].sum(), lam[rank:].sum()
    if rank < lam.numel():
        spectral = torch.where(lam[rank - 1] > 0, lam[-1] / lam[rank - 1], 0.0)
    else:
        spectral = torch.zeros((), dtype=torch.float64, device=Q.device)
    return {"Q": Q, "M": M, "lam": lam, "Um": Um, "tail": tail, "outside": outside,
            "delta": (top - energy_y).clamp_min(0.0), "spectral": spectral}


@dataclass(frozen=True, eq=False)
class _SketchState:
    """The sketch's state between iterations, on the device: what the stopping iteration left, frozen once done."""

    done: Tensor  # bool
    converged: Tensor  # bool
    iters: Tensor  # int64: power iterations counted as the host loop counted them
    delta_prev: Tensor
    step: dict[str, Tensor] | None = None

    @property
    def M(self) -> Tensor:
        return self.step["M"]

    @classmethod
    def start(cls, dev: torch.device) -> _SketchState:
        f = torch.zeros((), dtype=torch.bool, device=dev)
        return cls(done=f, converged=f, iters=torch.zeros((), dtype=torch.int64, device=dev),
                   delta_prev=torch.full((), math.inf, dtype=torch.float64, device=dev))

    def advance(self, new: dict[str, Tensor], it: int, *, full: bool, target: float, last: bool) -> _SketchState:
        """Today's stopping rule on tensors; a state already done stays as it was."""
        delta, dp = new["delta"], self.delta_prev
        ok = (dp > 0) & torch.isfinite(dp)
        observed = torch.where(ok, torch.sqrt(delta / torch.where(ok, dp, 1.0)), 0.0)  # two half-steps apart
        c = torch.clamp(torch.maximum(new["spectral"], observed), max=0.9)
        judged = (delta * c / (1.0 - c) <= target * (new["tail"] + new["outside"])) if it >= 1 else torch.zeros_like(self.done)
        converged = (delta == 0.0) | judged | full
        stop = converged | last
        keep = self.done
        step = new if self.step is None else {key: torch.where(keep, self.step[key], val) for key, val in new.items()}
        return _SketchState(done=keep | stop, converged=torch.where(keep, self.converged, converged),
                            iters=torch.where(keep | stop, self.iters, self.iters + 1),
                            delta_prev=torch.where(keep, dp, delta), step=step)

    def result(self, rank: int, ell: int) -> RandomizedSVD:
        lam, Um, M, Q = self.step["lam"], self.step["Um"], self.step["M"], self.step["Q"]
        S = lam.sqrt()
        c = min(rank, int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0)  # √eps₆₄ below σ₁: squared away
        Vh = (Um[:, :c].T @ M) / S[:c, None]
        return RandomizedSVD(U=Q @ Um[:, :c], S=S[:c], Vh=Vh, power_iterations=int(self.iters),
                             converged=bool(self.converged), sketch=ell, residual_sq=float(self.step["tail"] + self.step["outside"]))


def _sketch_start(op: Ideal, rank: int, *, tol: float, oversample: int | None, seed: int, test_vectors: int):
    """What both loops start from: the sketch size ℓ, whether it spans the range (``full``), the m test vectors, the
    first sketch Y = ΔW*·orth(Ω) and the test products Yt = ΔW*·Ω_t (seeded), and the stopping target from ``tol``."""
    d, k = op.shape
    n, dev, dtype = op.n, op.B.device, op.B.dtype
    p = 10 if oversample is None else oversample
    ell = min(rank + p, n, d, k)
    full = ell >= min(n, d, k)  # the sketch spans the range: exact in exact arithmetic
    m = 0 if full else test_vectors
    gen = torch.Generator(device=dev).manual_seed(seed)
    omega = torch.randn(k, ell + m, generator=gen, device=dev, dtype=dtype)
    first = op.mm(torch.cat([_orth(omega[:, :ell]), omega[:, ell:]], dim=1))  # orthonormal start: σ̃ comparable
    Y, Yt = first[:, :ell], first[:, ell:].to(torch.float64)  # ΔW* Ω_t: independent of every Q below
    return ell, full, m, Y, Yt, (1.0 - 1.0 / (1.0 + tol) ** 2) / 2.0


def _reference_randomized_svd(op: Ideal, rank: int, *, tol: float = 0.01, oversample: int | None = None, max_power: int = 12,
                   seed: int = 0, test_vectors: int = 8) -> RandomizedSVD:
    """Today's loop, one host read per quantity per iteration: the reference of ``batch_mode("off")``."""
    ell, full, m, Y, Yt, target = _sketch_start(op, rank, tol=tol, oversample=oversample, seed=seed, test_vectors=test_vectors)
    dtype, iters, delta_prev = op.B.dtype, 0, math.inf
    while True:
        Q, R = torch.linalg.qr(Y.to(torch.float64))
        energy_y = float(torch.linalg.svdvals(R).square()[:rank].sum())
        M = (((Q.T.to(dtype) @ op.B) * op.wcol) @ op.A).to(torch.float64)  # QᵀΔW* = (QᵀB) W A, ℓ×k
        lam, Um = torch.linalg.eigh(M @ M.T)  # ℓ×ℓ: the squares of M's singular values, ascending
        lam, Um = lam.flip(0).clamp_min(0.0), Um.flip(1)
        top, tail = float(lam[:rank].sum()), float(lam[rank:].sum())
        outside = float((Yt - Q @ (Q.T @ Yt)).square().sum()) / m if m else 0.0
        delta = max(top - energy_y, 0.0)
        spectral = float(lam[-1] / lam[rank - 1]) if rank < lam.numel() and lam[rank - 1] > 0 else 0.0
        observed = math.sqrt(delta / delta_prev) if 0 < delta_prev < math.inf else 0.0  # two half-steps apart
        c = min(max(spectral, observed), 0.9)
        # The first half-step starts from a random subspace, whose error follows the range finder's bound, not
        # the geometric rate: the rule judges only after one power iteration (found by hypothesis: a 12% miss).
        converged = full or delta == 0.0 or (iters >= 1 and delta * c / (1.0 - c) <= target * (tail + outside))
        if converged or iters >= max_power:
            break
        Y = op.mm(_orth(M.T.to(dtype)))  # ΔW* Q_z with Q_z = orth((QᵀΔW*)ᵀ) = orth(ΔW*ᵀQ)
        iters, delta_prev = iters + 1, delta
    S = lam.sqrt()
    c = min(rank, int((S > S[0] * 1e-7).sum()) if S.numel() and S[0] > 0 else 0)  # √eps₆₄ below σ₁: squared away
    Vh = (Um[:, :c].T @ M) / S[:c, None]
    return RandomizedSVD(U=Q @ Um[:, :c], S=S[:c], Vh=Vh, power_iterations=iters, converged=converged, sketch=ell,
                         residual_sq=tail + outside)
