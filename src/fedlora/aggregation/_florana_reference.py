"""Today's (per-scalar host reads) Gram-free FLoRA-NA solver, the reference of ``batch_mode("off")`` (its loop kept
as it was; the problem it works on, :class:`Problem`, is the one the batched solver builds too): the equality tests
and ``benchmarks/bench_aggregation.py --batched`` compare the batched solver in ``florana.py`` with it.
``florana.py`` passes its ``_Centred`` and ``_fix_scale`` in, so this module does not import it back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import combine
from .result import Aggregate
from .sketch import compute_dtype


def reference_solve(self, S: Tensor, target: Tensor, c: Tensor, *, gain: float, max_steps: int) -> tuple[Tensor, int]:
    """Today's ``_Centred.solve`` (``self`` is the ``_Centred`` side), one host read per scalar."""
    P = lambda v: v - v.mean()  # noqa: E731  projection onto 1ᵀδ = 0
    SM = self.metric(self.mean, S)
    h_tt = float((self.mean * SM).sum())
    h = self.dots(SM)  # ⟨Δ_u, 𝒮T̄⟩
    b_t, b = float((self.mean * target).sum()), self.dots(target)
    G_diag = torch.einsum("uij,ij->u", self.grams, S)
    if h_tt > 0:
        K = lambda x: P(self.dots(self.metric(self.deviation(x), S)) - h * (float(h @ x) / h_tt))  # noqa: E731
        rhs, diag = P(b - h * (b_t / h_tt)), G_diag - h.square() / h_tt
    else:  # T̄ = 0: the common coefficient t has no effect
        K = lambda x: P(self.dots(self.metric(self.deviation(x), S)))  # noqa: E731
        rhs, diag = P(b), G_diag
    t0 = float(c.sum())
    delta, steps = reference_pcg(K, rhs, diag, P(c - t0 * self.w), gain=gain, max_steps=max_steps, project=P)
    t = (b_t - float(h @ delta)) / h_tt if h_tt > 0 else t0
    return t * self.w + delta, steps




def reference_pcg(mv, b: Tensor, diag: Tensor, x: Tensor, *, gain: float, max_steps: int, project=None) -> tuple[Tensor, int]:
    """Jacobi-preconditioned conjugate gradients for ``K x = b`` (K PSD, given as ``mv``), from ``x``; float64.

    The half-step minimises ``xᵀKx − 2bᵀx`` (the objective less a constant), and ``rᵀz`` with ``z = M⁻¹r`` estimates
    what is still to gain, ``rᵀK⁻¹r``, where the preconditioner M is close to K: iteration stops once that is at
    most ``gain`` (an absolute amount of objective), or after ``max_steps``. ``project`` keeps the iterates in a
    subspace (applied to every preconditioned residual)."""
    project = project or (lambda v: v)
    inv = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, 1.0), 1.0)
    res = b - mv(x)
    z = project(inv * res)
    d, rz = z.clone(), float(res @ z)
    for step in range(max_steps):
        if rz <= gain:
            return x, step
        Hd = mv(d)
        curv = float(d @ Hd)
        if not curv > 0:  # d in K's null space (all-zero factors): nothing left to gain
            return x, step
        alpha = rz / curv
        x, res = x + alpha * d, res - alpha * Hd
        z = project(inv * res)
        rz_new = float(res @ z)
        d, rz = z + (rz_new / rz) * d, rz_new
    return x, max_steps


@dataclass
class Problem:
    """What both Gram-free solvers work on: the centred sides (``B_u = B̄ + E_u``, ``A_u = Ā + D_u``), products with
    ``ΔW* = B̄Ā + E W D`` without forming it (the common part in float64, the deviations in the compute dtype), and
    the seeded probes Ω with ΔW*Ω, from which ‖(ΔW* − B̂Â)Ω‖²/m estimates the objective."""

    dtype: torch.dtype
    wd: Tensor
    Bside: object
    Aside: object
    wcol: Tensor
    omega: Tensor | None = None
    X_omega: Tensor | None = None

    @property
    def B_bar(self) -> Tensor:
        return self.Bside.mean

    @property
    def A_bar(self) -> Tensor:
        return self.Aside.mean

    def X_mm(self, x: Tensor) -> Tensor:  # ΔW* x for x k×m (float64 out)
        f64, E, D = torch.float64, self.Bside.dev, self.Aside.dev
        return self.B_bar @ (self.A_bar @ x.to(f64)) + (E @ (self.wcol[:, None] * (D @ x.to(self.dtype)))).to(f64)

    def X_rmm_t(self, Y: Tensor) -> Tensor:  # Yᵀ ΔW* for Y d×m (float64 out, m×k)
        f64, E, D = torch.float64, self.Bside.dev, self.Aside.dev
        return (Y.T.to(f64) @ self.B_bar) @ self.A_bar + (((Y.T.to(self.dtype) @ E) * self.wcol) @ D).to(f64)


def problem(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, probes: int, seed: int, centred) -> Problem:
    """The :class:`Problem` of these uploads (``centred``: florana's ``_Centred``), its probes drawn from ``seed``."""
    f64, dev = torch.float64, Bs[0].device
    dtype = compute_dtype(Bs[0].dtype)
    wd = w.to(dev, f64)
    Bside, Aside = centred(Bs, wd, "B", dtype), centred(As, wd, "A", dtype)
    pb = Problem(dtype, wd, Bside, Aside, wd.repeat_interleave(Bside.r).to(dtype))
    gen = torch.Generator(device=dev).manual_seed(seed)
    pb.omega = torch.randn(As[0].shape[1], probes, generator=gen, device=dev, dtype=dtype).to(f64)
    pb.X_omega = pb.X_mm(pb.omega)
    return pb


def reference_iterative(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, tol: float, max_iter: int, seed: int,
               probes: int = 8, cg_steps: int = 50, centred, fix_scale) -> Aggregate:
    """Today's ``_iterative`` (``batch_mode("off")``): the reference of the batched solver's tests and benchmark."""
    pb = problem(Bs, As, w, probes=probes, seed=seed, centred=centred)
    f64, dtype, wd, Bside, Aside, B_bar, A_bar = torch.float64, pb.dtype, pb.wd, pb.Bside, pb.Aside, pb.B_bar, pb.A_bar
    X_mm, X_rmm_t, omega, X_omega = pb.X_mm, pb.X_rmm_t, pb.omega, pb.X_omega

    def estimate(B_hat: Tensor, A_hat: Tensor) -> float:  # ‖(ΔW* − B̂Â)Ω‖²/m: unbiased for the objective
        return float((X_omega - B_hat @ (A_hat @ omega)).square().sum()) / probes

    p, q = wd.clone(), wd.clone()
    B_hat, A_hat = B_bar, A_bar  # the FedIT point
    rel = max(tol, 1e-6 if dtype != f64 else 0.0)  # float32 products: objective changes below ~1e-6 are rounding
    f_scale = estimate(B_hat, A_hat)  # FedIT's objective, estimated: the scale of every tolerance below
    cg_total, phi_hist, sweeps, converged, phi_fedit = 0, [], 0, False, None
    for sweep in range(1, max_iter + 1):
        # p-step: min_p ‖ΔW* − (Σ p_u B_u) Â‖² = const + ⟨B(p), B(p)·ÂÂᵀ⟩ − 2⟨B(p), ΔW*Âᵀ⟩
        S = A_hat @ A_hat.T
        XA = X_mm(A_hat.T)
        if phi_fedit is None:  # FedIT's φ = −2⟨ΔW*, B̄Ā⟩ + ‖B̄Ā‖², from the same product
            phi_fedit = -2.0 * float((B_bar * XA).sum()) + float(((B_bar.T @ B_bar) * S).sum())
        p, steps = reference_solve(Bside, S, XA, p, gain=rel * f_scale / 10, max_steps=cg_steps)
        cg_total += steps
        B_hat = Bside.combine(p)
        # q-step: min_q ‖ΔW* − B̂ (Σ q_u A_u)‖² = const + ⟨A(q), B̂ᵀB̂·A(q)⟩ − 2⟨A(q), B̂ᵀΔW*⟩
        S = B_hat.T @ B_hat
        XtB = X_rmm_t(B_hat)
        q, steps = reference_solve(Aside, S, XtB, q, gain=rel * f_scale / 10, max_steps=cg_steps)
        cg_total += steps
        A_hat = Aside.combine(q)
        phi = -2.0 * float((XtB * A_hat).sum()) + float((S * (A_hat @ A_hat.T)).sum())
        phi_hist.append(phi)
        sweeps = sweep
        f_scale = estimate(B_hat, A_hat)
        if len(phi_hist) > 1 and phi_hist[-2] - phi <= rel * f_scale:
            converged = True
            break
    norm_sq = f_scale - (phi_hist[-1] if phi_hist else 0.0)  # ‖ΔW*‖² estimate, consistent with f_scale
    info = {"solver": "iterative", "iterations": sweeps, "cg_steps": cg_total, "converged": converged, "restarts": 0,
            "objective": [norm_sq + x for x in ([phi_fedit] if phi_fedit is not None else []) + phi_hist],
            "objective_is_estimate": True, "start": 0}
    if not phi_hist or not min(phi_hist) < phi_fedit:
        info.update(fell_back_to_fedit=True, scale="sum(q)=1")
        return Aggregate(method="florana", B=combine(Bs, w), A=combine(As, w), p=w.clone(), q=w.clone(), info=info)
    p, q, scale = fix_scale(p.cpu(), q.cpu())
    info.update(fell_back_to_fedit=False, scale=scale, objective_best=norm_sq + phi_hist[-1])
    return Aggregate(method="florana", B=combine(Bs, p), A=combine(As, q), p=p, q=q, info=info)
