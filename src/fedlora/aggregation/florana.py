"""FLoRA-NA (Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in Federated
Low-Rank Adaptation", arXiv:2509.26399, 2025): the best coefficient combination of the clients' factors.

``B̂ = Σ p_u B_u``, ``Â = Σ q_u A_u`` with ``(p, q) = argmin ‖ΔW* − B̂Â‖_F²``, ``ΔW* = Σ w_u B_u A_u``. It
broadcasts exactly FedIT's bytes but follows ΔW* more closely. The paper learns p, q by gradient steps;
this module solves for them exactly by alternating least squares in the Gram space:

* For fixed q the objective is a linear least-squares problem in p (and vice versa). With the Gram blocks
  ``GB_uv = B_uᵀB_v`` and ``GA_ab = A_aA_bᵀ`` (r×r each) its normal equations ``H p = g`` are
  ``H_uv = tr(GB_uv ÂÂᵀ)`` with ``ÂÂᵀ = Σ_ab q_a q_b GA_ab`` and ``g_u = Σ_v w_v tr(GB_uv A_vÂᵀ)`` with
  ``A_vÂᵀ = Σ_b q_b GA_vb`` — so one sweep costs O(U²r² + U³) and nothing d×k is ever formed. The Grams
  themselves cost O((d+k)(Ur)²), once, in float64.
* Each half-step is an exact minimiser (``lstsq``, so singular systems from all-zero B or duplicated
  clients give the minimum-norm solution), hence the objective never increases. A start stops when a sweep
  lowers the objective by at most ``tol`` relative (or it reaches the float64 noise floor of the Gram
  identity, ~1e-14·‖ΔW*‖²), or after ``max_iter`` sweeps.
* The first start is the FedIT point ``p = q = w``, so the result is never worse than FedIT; if the solver
  cannot improve on it, the FedIT point itself is returned. The objective is a quartic with local minima
  (alternating from FedIT alone stops in a worse one for a few percent of random heterogeneous clients),
  so ``restarts`` further seeded random starts run in the same batched solve and the best is kept.
* Scale convention: ``(c·p, q/c)`` give the same ``B̂Â``; we report ``Σ_u q_u = 1`` (so a shared A
  comes back unchanged), or ``‖q‖₁ = 1`` when ``|Σ q| < 1e-6·‖q‖₁``.

Cost: O((d+k)(Ur)²) for the Grams plus O(S·(U²r² + U³)) per sweep for S = 1 + restarts starts.

**Many clients** (``solver="auto"`` above ``svd.EXACT_MAX_COLUMNS`` stacked columns, or ``solver="iterative"``):
the Grams are quadratic in U in time and memory ((Ur)² each), so the same alternating least squares runs without
them. Each half-step's normal equations are solved by preconditioned conjugate gradients whose products go
through the stacked factors only: for the p-step ``g_u = ⟨B_u, ΔW* Âᵀ⟩`` (one product of ΔW* with r columns,
``sketch.Ideal``) and ``(H x)_u = ⟨B_u, (Σ_v x_v B_v)·ÂÂᵀ⟩`` (two d×Ur-by-r GEMMs), Jacobi-preconditioned by
``H_uu = tr(B_uᵀB_u ÂÂᵀ)``; the q-step likewise with the A side. O((d+k)·Ur·r) per product, linear in U, nothing
(Ur)². CG starts from the previous sweep's coefficients. The run starts at the FedIT point and keeps no random
restarts (measured: from FedIT the alternation reaches the best of 9 starts on clients that drift from a common
start, the regime of federated rounds; docs/aggregation.md). Convergence is judged on the exact change of the
shifted objective ``φ = ‖ΔW* − B̂Â‖² − ‖ΔW*‖² = −2⟨ΔW*, B̂Â⟩ + ‖B̂Â‖²`` against an unbiased estimate of the
objective itself (``‖(ΔW* − B̂Â)Ω‖²/m`` on m fixed Gaussian probes): ‖ΔW*‖² alone would need the Grams. The
result falls back to FedIT if it does not beat FedIT's φ. Products run in the uploads' dtype (float32 for
float32 uploads), so the stopping tolerance is at least 1e-6 there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import batched, check_every
from ._common import check_int, check_tol, combine, gram, stack
from ._florana_reference import problem, reference_iterative
from .fedit import factors_comm
from .registry import register_rule
from .result import Aggregate
from .svd import EXACT_MAX_COLUMNS

FLORANA_SOLVERS = ("auto", "exact", "iterative")

_FLOOR = 64 * torch.finfo(torch.float64).eps  # relative noise floor of the Gram-form objective


class _Side:
    """The Gram blocks of one factor, laid out once so that each half-step is three small matmuls."""

    def __init__(self, G: Tensor) -> None:  # G: (U, r, U, r) blocks G_uv
        U, r = G.shape[0], G.shape[1]
        self.U, self.r = U, r
        as_other = G.permute(0, 1, 3, 2).contiguous()  # [a, i, j, b]
        self.by_coeff = as_other.view(U * r * r, U)
        as_self = G.permute(0, 2, 1, 3).contiguous()  # [u, v, i, j]
        self.pairs = as_self.view(U * U, r * r)
        self.rows = as_self.view(U, U * r * r)


def _normal_equations(me: _Side, other: _Side, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``H x = g`` for the coefficients x of one factor, the other fixed at coefficients ``c`` (S×U).

    For the p-step (me = B, other = A): ``V_v = A_vÂᵀ = Σ_b c_b GA_vb``, ``ÂÂᵀ = Σ_a c_a V_a``,
    ``H_uv = tr(GB_uv ÂÂᵀ)``, ``g_u = Σ_v w_v tr(GB_uv V_v)``. O(S·U²r²).
    """
    U, r, S = me.U, me.r, c.shape[0]
    V = (other.by_coeff @ c.T).view(U, r, r, S)  # V[a, i, j, s]
    gram_hat = (V * c.T[:, None, None, :]).sum(0)  # ÂÂᵀ[i, j, s]
    H = (me.pairs @ gram_hat.transpose(0, 1).reshape(r * r, S)).view(U, U, S).permute(2, 0, 1)
    g = me.rows @ (V.transpose(1, 2) * w[:, None, None, None]).reshape(U * r * r, S)
    return H, g.T


def _objective(ideal_sq: Tensor, H: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """‖ΔW* − B̂Â‖² = ‖ΔW*‖² − 2gᵀx + xᵀHx for each start (rows of x)."""
    return ideal_sq - 2 * (g * x).sum(-1) + torch.einsum("su,suv,sv->s", x, H, x)


def _solve(H: Tensor, g: Tensor) -> Tensor:
    return torch.linalg.lstsq(H, g.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _fix_scale(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, str]:
    l1 = float(q.abs().sum())
    if l1 == 0.0:
        return torch.zeros_like(p), q, "zero"
    total = float(q.sum())
    if abs(total) >= 1e-6 * l1:
        return p * total, q / total, "sum(q)=1"
    return p * l1, q / l1, "l1(q)=1"


@register_rule("florana", comm=factors_comm)
def florana(
    Bs: list[Tensor],
    As: list[Tensor],
    w: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    restarts: int = 8,
    seed: int = 0,
    solver: str = "auto",
) -> Aggregate:
    tol = check_tol(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", 0)
    restarts = check_int(restarts, "restarts", 0)
    seed = check_int(seed, "seed", 0)
    if solver not in FLORANA_SOLVERS:
        raise ValueError(f"solver is {solver!r}; pass one of {', '.join(map(repr, FLORANA_SOLVERS))}")
    U, r = len(Bs), Bs[0].shape[1]
    if solver == "iterative" or (solver == "auto" and U * r > EXACT_MAX_COLUMNS):
        return _iterative(Bs, As, w, tol=tol, max_iter=max_iter, seed=seed)

    GB = gram(stack(Bs, dim=1)).view(U, r, U, r)  # B_catᵀ B_cat
    GA = gram(stack(As, dim=0), rows=True).view(U, r, U, r)  # A_cat A_catᵀ
    ideal_sq = torch.einsum("u,uivj,v,vjui->", w, GB, w, GA)  # ‖ΔW*‖²
    GB, GA = _Side(GB), _Side(GA)

    gen = torch.Generator().manual_seed(seed)
    q = torch.cat([w[None], torch.randn(restarts, U, generator=gen, dtype=torch.float64)])
    H, g = _normal_equations(GB, GA, q, w)
    f_fedit = float(_objective(ideal_sq, H[:1], g[:1], w[None]))
    history = [f_fedit]
    info = {"iterations": 0, "objective": history, "ideal_sq_norm": float(ideal_sq), "start": 0, "solver": "exact"}

    def fedit_point(converged: bool) -> Aggregate:
        info.update(converged=converged, fell_back_to_fedit=True, scale="sum(q)=1")
        return Aggregate(
            method="florana", B=combine(Bs, w), A=combine(As, w), p=w.clone(), q=w.clone(), info=info
        )

    floor = _FLOOR * float(ideal_sq)
    if f_fedit <= floor:  # FedIT is already exact to rounding (one client, identical clients, all B = 0)
        return fedit_point(converged=True)

    best_f = torch.full((q.shape[0],), float("inf"), dtype=torch.float64)
    best_f[0] = f_fedit
    best_p, best_q = w[None].repeat(q.shape[0], 1), q.clone()
    active = torch.ones(q.shape[0], dtype=torch.bool)
    for sweep in range(1, max_iter + 1):
        p = _solve(H, g)
        H, g = _normal_equations(GA, GB, p, w)
        q = _solve(H, g)
        f = _objective(ideal_sq, H, g, q)
        better = f < best_f
        stalled = ~better | (best_f - f <= tol * best_f.abs()) | (f <= floor)
        best_p[better], best_q[better], best_f[better] = p[better], q[better], f[better]
        active &= ~stalled
        history.append(float(best_f[0]))
        info["iterations"] = sweep
        if not active.any():
            break
        H, g = _normal_equations(GB, GA, q, w)
    info["converged"] = not bool(active.any())

    s = int(torch.argmin(best_f))
    if not float(best_f[s]) < f_fedit:
        return fedit_point(converged=info["converged"])
    p, q, scale = _fix_scale(best_p[s], best_q[s])
    info.update(start=s, fell_back_to_fedit=False, scale=scale, objective_best=float(best_f[s]))
    return Aggregate(method="florana", B=combine(Bs, p), A=combine(As, q), p=p, q=q, info=info)


def _centred(ts: list[Tensor], w: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The weighted mean (float64) and the stacked deviations ``T_u − T̄`` (``dtype``) of one side's factors.

    Clients drifting from one start share a large common part; products of the raw stack in float32 round it at
    1e-7 of its size, which swamps the small deviations the solver must resolve (round one: the As differ by
    ~1e-2). Deviations formed in float64 and stored in float32 keep 1e-7 of their own size."""
    if ts[0].device.type != "cpu":  # an accelerator: a few batched kernels, not 3U launches (memory is ample there)
        st = torch.stack(list(ts)).to(torch.float64)
        mean = torch.tensordot(w.to(st.device, torch.float64), st, dims=1)
        devs = (st - mean).to(dtype)
        out = devs.permute(1, 0, 2).reshape(st.shape[1], -1) if dim == 1 else devs.reshape(-1, st.shape[2])
        return mean, out
    mean = torch.zeros_like(ts[0], dtype=torch.float64)
    for t, c in zip(ts, w.tolist()):
        mean.add_(t.to(torch.float64), alpha=c)
    size = ts[0].shape[dim]
    shape = list(ts[0].shape)
    shape[dim] = size * len(ts)
    out = torch.empty(shape, dtype=dtype, device=mean.device)  # filled in place: no list of copies, no cat
    for u, t in enumerate(ts):
        out.narrow(dim, u * size, size).copy_(t.to(torch.float64) - mean)
    return mean, out


class _Centred:
    """One side's factors as ``T_u = T̄ + Δ_u``, with Σ_u w_u Δ_u = 0, and that side's half-step solver.

    Coefficients are written ``c = t·w + δ`` with ``1ᵀδ = 0``, so that ``Σ c_u T_u = t·T̄ + Σ δ_u Δ_u``: the large
    common direction t is eliminated exactly (a scalar Schur complement) and conjugate gradients run on δ alone,
    whose normal matrix is the deviations' Gram — well conditioned where the raw one has one eigenvalue U/ε²
    times the rest. Side "B": T_u is d×r and the quadratic is ``⟨Y, Y S⟩``; side "A": r×k and ``⟨Y, S Y⟩``."""

    def __init__(self, ts: list[Tensor], w: Tensor, side: str, dtype: torch.dtype) -> None:
        self.side, self.w, self.U, self.r = side, w, len(ts), ts[0].shape[1 if side == "B" else 0]
        self.mean, self.dev = _centred(ts, w, 1 if side == "B" else 0, dtype)
        self.dtype = dtype
        U, r = self.U, self.r
        self.eye = torch.eye(r, dtype=dtype, device=w.device)
        if side == "B":
            blocks = self.dev.view(-1, U, r)
            self.grams = torch.einsum("dui,duj->uij", blocks, blocks).to(torch.float64)  # Δ_uᵀΔ_u
        else:
            blocks = self.dev.view(U, r, -1)
            self.grams = torch.einsum("uik,ujk->uij", blocks, blocks).to(torch.float64)  # Δ_uΔ_uᵀ

    def _select(self, c: Tensor) -> Tensor:  # Ur×r block column [c_1 I; …; c_U I]
        return (c.to(self.dtype)[:, None, None] * self.eye).reshape(self.U * self.r, self.r)

    def _block_trace(self, m: Tensor) -> Tensor:  # Ur×r → (Σ_i m[u·r + i, i])_u
        return m.view(self.U, self.r, self.r).diagonal(dim1=1, dim2=2).sum(-1).to(torch.float64)

    def deviation(self, delta: Tensor) -> Tensor:  # Σ δ_u Δ_u, float64
        if self.side == "B":
            return (self.dev @ self._select(delta)).to(torch.float64)
        return (self._select(delta).T @ self.dev).to(torch.float64)

    def combine(self, c: Tensor) -> Tensor:  # Σ c_u T_u, float64
        return c.sum() * self.mean + self.deviation(c)

    def dots(self, Y: Tensor) -> Tensor:  # (⟨Δ_u, Y⟩)_u
        if self.side == "B":
            return self._block_trace(self.dev.T @ Y.to(self.dtype))
        return self._block_trace(self.dev @ Y.T.to(self.dtype))

    def metric(self, Y: Tensor, S: Tensor) -> Tensor:
        return Y @ S if self.side == "B" else S @ Y

    def solve(self, S: Tensor, target: Tensor, c: Tensor, *, gain: Tensor, max_steps: int,
              stop: Tensor) -> tuple[Tensor, Tensor]:
        """argmin_c ⟨T(c), 𝒮 T(c)⟩ − 2⟨T(c), target⟩ with T(c) = Σ c_u T_u, 𝒮 the metric of S; from c.

        Every scalar stays on the device (``gain`` and the step count too); the Schur complement's ``h_tt > 0``
        branch is a ``torch.where``. ``stop`` set: CG returns at its first check (the sweep loop has stopped)."""
        P = lambda v: v - v.mean()  # noqa: E731  projection onto 1ᵀδ = 0
        SM = self.metric(self.mean, S)
        h_tt = (self.mean * SM).sum()
        h = self.dots(SM)  # ⟨Δ_u, 𝒮T̄⟩
        b_t, b = (self.mean * target).sum(), self.dots(target)
        G_diag = torch.einsum("uij,ij->u", self.grams, S)
        pos = h_tt > 0  # else T̄ = 0: the common coefficient t has no effect (the terms below vanish exactly)
        h_tt1 = torch.where(pos, h_tt, 1.0)
        K = lambda x: P(self.dots(self.metric(self.deviation(x), S)) - h * torch.where(pos, (h @ x) / h_tt1, 0.0))  # noqa: E731
        rhs, diag = P(b - h * torch.where(pos, b_t / h_tt1, 0.0)), G_diag - torch.where(pos, h.square() / h_tt1, 0.0)
        t0 = c.sum()
        delta, steps = _pcg(K, rhs, diag, P(c - t0 * self.w), gain=gain, max_steps=max_steps, project=P, stop=stop)
        t = torch.where(pos, (b_t - h @ delta) / h_tt1, t0)
        return t * self.w + delta, steps


def _pcg(mv, b: Tensor, diag: Tensor, x: Tensor, *, gain: Tensor, max_steps: int, project=None,
         stop: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Jacobi-preconditioned conjugate gradients for ``K x = b`` (K PSD, given as ``mv``), from ``x``; float64.

    The half-step minimises ``xᵀKx − 2bᵀx`` (the objective less a constant), and ``rᵀz`` with ``z = M⁻¹r`` estimates
    what is still to gain, ``rᵀK⁻¹r``, where the preconditioner M is close to K: iteration stops once that is at
    most ``gain`` (an absolute amount of objective), when the curvature ``dᵀKd`` is not positive (d in K's null
    space: all-zero factors), or after ``max_steps``. ``project`` keeps the iterates in a subspace.

    Host synchronisation: the stopping tests are device flags; the host reads "done" every
    ``_batch.CHECK_EVERY`` steps (4), starting with the first. Steps after "done"
    are computed and discarded (``torch.where`` keeps the stopping step's iterate), so the result and the returned
    step count (a device tensor) equal the per-step loop's (``_florana_reference.reference_pcg``)."""
    project = project or (lambda v: v)
    every = check_every()
    inv = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, 1.0), 1.0)
    res = b - mv(x)
    z = project(inv * res)
    d, rz = z.clone(), res @ z
    done = torch.zeros((), dtype=torch.bool, device=x.device) if stop is None else stop.clone()
    steps = torch.zeros((), dtype=torch.int64, device=x.device)
    for step in range(max_steps):
        done = done | (rz <= gain)
        if step % every == 0 and bool(done):  # the only host read
            break
        Hd = mv(d)
        curv = d @ Hd
        done = done | ~(curv > 0)
        alpha = rz / curv
        x_new, res_new = x + alpha * d, res - alpha * Hd
        z = project(inv * res_new)
        rz_new = res_new @ z
        d_new = z + (rz_new / rz) * d
        x, res = torch.where(done, x, x_new), torch.where(done, res, res_new)
        d, rz = torch.where(done, d, d_new), torch.where(done, rz, rz_new)
        steps = steps + (~done).long()
    return x, steps


def _iterative(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, tol: float, max_iter: int, seed: int,
               probes: int = 8, cg_steps: int = 50) -> Aggregate:
    """FLoRA-NA's alternating least squares without Grams: CG on each half-step, O((d+k)·Ur·r) per product.

    Works on ``B_u = B̄ + E_u``, ``A_u = Ā + D_u`` (``_Centred``), so ``ΔW* = B̄Ā + E W D`` (the cross terms vanish
    as Σ w_u E_u = Σ w_u D_u = 0): the common part in float64, the deviations in the compute dtype.

    Host synchronisation: no scalar is read back inside the sweeps or the CG steps. The sweep's stopping test is a
    device flag read every ``_batch.CHECK_EVERY`` sweeps (4); a sweep after the stop runs
    with its CG solves returning at their first check and its results discarded (``torch.where``), so the result,
    the history and the counts equal today's per-scalar loop (``_florana_reference``), which runs instead for
    uploads on the CPU (``batch_mode``: there a host read costs nothing and masked sweeps would be waste)."""
    if not batched(Bs[0].device):
        return reference_iterative(Bs, As, w, tol=tol, max_iter=max_iter, seed=seed, probes=probes, cg_steps=cg_steps,
                                   centred=_Centred, fix_scale=_fix_scale)
    pb, dev = problem(Bs, As, w, probes=probes, seed=seed, centred=_Centred), Bs[0].device
    f64, dtype, wd, Bside, Aside, B_bar, A_bar = torch.float64, pb.dtype, pb.wd, pb.Bside, pb.Aside, pb.B_bar, pb.A_bar
    X_mm, X_rmm_t, omega, X_omega = pb.X_mm, pb.X_rmm_t, pb.omega, pb.X_omega

    def estimate(B_hat: Tensor, A_hat: Tensor) -> Tensor:  # ‖(ΔW* − B̂Â)Ω‖²/m: unbiased for the objective
        return (X_omega - B_hat @ (A_hat @ omega)).square().sum() / probes

    rel = max(tol, 1e-6 if dtype != f64 else 0.0)  # float32 products: objective changes below ~1e-6 are rounding
    st = {"p": wd.clone(), "q": wd.clone(), "B": B_bar, "A": A_bar, "f": estimate(B_bar, A_bar)}  # the FedIT point
    every = check_every()
    done = torch.zeros((), dtype=torch.bool, device=dev)
    converged, cg_total, phi_prev, phi_fedit = done, torch.zeros((), dtype=torch.int64, device=dev), None, None
    phis, lives = [], []
    for sweep in range(1, max_iter + 1):
        # p-step: min_p ‖ΔW* − (Σ p_u B_u) Â‖² = const + ⟨B(p), B(p)·ÂÂᵀ⟩ − 2⟨B(p), ΔW*Âᵀ⟩
        S = st["A"] @ st["A"].T
        XA = X_mm(st["A"].T)
        if phi_fedit is None:  # FedIT's φ = −2⟨ΔW*, B̄Ā⟩ + ‖B̄Ā‖², from the same product
            phi_fedit = -2.0 * (B_bar * XA).sum() + ((B_bar.T @ B_bar) * S).sum()
        gain = rel * st["f"] / 10  # the scale of every tolerance: the objective's estimate
        p, steps_p = Bside.solve(S, XA, st["p"], gain=gain, max_steps=cg_steps, stop=done)
        B_hat = Bside.combine(p)
        # q-step: min_q ‖ΔW* − B̂ (Σ q_u A_u)‖² = const + ⟨A(q), B̂ᵀB̂·A(q)⟩ − 2⟨A(q), B̂ᵀΔW*⟩
        S = B_hat.T @ B_hat
        XtB = X_rmm_t(B_hat)
        q, steps_q = Aside.solve(S, XtB, st["q"], gain=gain, max_steps=cg_steps, stop=done)
        A_hat = Aside.combine(q)
        phi = -2.0 * (XtB * A_hat).sum() + (S * (A_hat @ A_hat.T)).sum()
        f = estimate(B_hat, A_hat)
        live = ~done
        new = {"p": p, "q": q, "B": B_hat, "A": A_hat, "f": f}
        st = {key: torch.where(live, new[key], st[key]) for key in st}
        stop = (phi_prev - phi <= rel * f) if phi_prev is not None else torch.zeros_like(done)
        converged = torch.where(live, stop, converged)
        cg_total = cg_total + torch.where(live, steps_p + steps_q, 0)
        phis.append(phi)
        lives.append(live)
        phi_prev = torch.where(live, phi, phi_prev) if phi_prev is not None else phi
        done = done | stop
        if sweep % every == 0 and bool(done):  # the only host read of the sweep loop
            break
    return _iterative_result(Bs, As, w, st, phis, lives, phi_fedit, converged, cg_total)


def _iterative_result(Bs, As, w, st, phis, lives, phi_fedit, converged, cg_total) -> Aggregate:
    """The iterative solver's ``Aggregate`` from its device state: the host reads everything once, here."""
    phi_hist = torch.stack(phis)[torch.stack(lives)].tolist() if phis else []
    phi_fedit = float(phi_fedit) if phi_fedit is not None else None
    norm_sq = float(st["f"]) - (phi_hist[-1] if phi_hist else 0.0)  # ‖ΔW*‖² estimate, consistent with f_scale
    info = {"solver": "iterative", "iterations": len(phi_hist), "cg_steps": int(cg_total), "converged": bool(converged),
            "restarts": 0, "objective": [norm_sq + x for x in ([phi_fedit] if phi_fedit is not None else []) + phi_hist],
            "objective_is_estimate": True, "start": 0}
    if not phi_hist or not min(phi_hist) < phi_fedit:
        info.update(fell_back_to_fedit=True, scale="sum(q)=1")
        return Aggregate(method="florana", B=combine(Bs, w), A=combine(As, w), p=w.clone(), q=w.clone(), info=info)
    p, q, scale = _fix_scale(st["p"].cpu(), st["q"].cpu())
    info.update(fell_back_to_fedit=False, scale=scale, objective_best=norm_sq + phi_hist[-1])
    return Aggregate(method="florana", B=combine(Bs, p), A=combine(As, q), p=p, q=q, info=info)
