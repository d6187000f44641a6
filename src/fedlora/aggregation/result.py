"""What one server aggregation of one adapted matrix produces.

Pure data plus the dense views used by tests and metrics. Imports only torch; no method logic here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Aggregate"]


@dataclass(frozen=True, eq=False)
class Aggregate:
    """The server's answer for one adapted matrix ``W0 ∈ R^{d×k}``.

    Attributes:
        method: name of the rule that produced it (one of ``METHODS``).
        B, A: the factors broadcast to every client (``B̂`` d×r, ``Â`` r×k), in the uploads' dtype.
            ``B`` is ``None`` for ``fedsa`` (each client keeps its own B). For ``flora`` they are the
            stacked ``[B_1 … B_U]`` (d×Ur) and ``[w_1A_1; …; w_UA_U]`` (Ur×k).
        base_delta_factors: ``(L, R)`` with ``L`` d×m and ``R`` m×k; clients add ``L @ R`` to their frozen
            ``W0`` (``fedex`` only, where it is the residual ``ΔW* − B̂Â``). ``None`` otherwise.
        p, q: length-U float64 coefficients with ``B̂ = Σ p_u B_u`` and ``Â = Σ q_u A_u`` when the method is a
            coefficient method (``fedit``, ``ffa`` (p only), ``fedsa`` (q only), ``fedex``, ``florana``);
            ``None`` where the broadcast is not such a combination (``flora``, ``svd``). VeRA, whose factors
            are ``diag(λ)·shared``, aggregates its vectors with these same coefficients.
        eval_B: ``fedsa`` only: ``Σ w_u B_u``, used solely to score a global model, never broadcast.
        personalised: True when clients keep private state the server does not replace (``fedsa``).
        frozen_A: True when ``A`` is the frozen shared ``A0`` every client already holds (``ffa``; ``rolora``'s
            B-rounds): not sent.
        frozen_B: the mirror: ``B`` is the frozen shared B every client already holds (``rolora``'s A-rounds).
        core: ``fedsb``/``ravan``: the averaged trainable core ``C̄`` (h×r×r: one r×r block per head) between the
            frozen shared bases, so that ``B = B_0·blockdiag(C̄)`` and ``A = A_0``; only the core travels.
        clients: under mixed ranks or client scales, the ``(B, A)`` each client u receives, at its own rank r_u
            and scale s_u (``B̂[:, :r_u] / √s_u``, ``Â[:r_u] / √s_u``); ``None`` when every client receives ``B``, ``A``.
            With scales, ``B`` and ``A`` themselves are in the scaled product space (``B̂Â ≈ Σ w_u s_u B_u A_u``).
        info: method diagnostics (``florana``: iterations, objective history, convergence; ``svd``:
            singular values of the core, numerical rank).
    """

    method: str
    B: Tensor | None
    A: Tensor | None
    base_delta_factors: tuple[Tensor, Tensor] | None = None
    p: Tensor | None = None
    q: Tensor | None = None
    eval_B: Tensor | None = None
    personalised: bool = False
    frozen_A: bool = False
    frozen_B: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    clients: list[tuple[Tensor | None, Tensor | None]] | None = None
    core: Tensor | None = None

    @property
    def base_delta(self) -> Tensor | None:
        """Dense d×k residual ``L @ R`` that clients fold into ``W0`` (materialised on demand)."""
        if self.base_delta_factors is None:
            return None
        L, R = self.base_delta_factors
        return L @ R

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(d, k)`` of the adapted matrix, when the result carries enough to know it."""
        B = self.B if self.B is not None else self.eval_B
        if B is None or self.A is None:
            return None
        return B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """The effective dense update ``B̂Â + base_delta`` (d×k). For tests and metrics only.

        For ``fedsa`` this is ``eval_B @ Â``, the global model the evaluation protocol scores.
        """
        B = self.B if self.B is not None else self.eval_B
        if B is None or self.A is None:
            raise ValueError(
                f"this {self.method} result has no B to form B̂Â with; pass the clients' Bs to aggregate() "
                "so it can keep their weighted mean for scoring"
            )
        out = B @ self.A
        if self.base_delta_factors is not None:
            L, R = self.base_delta_factors
            out.addmm_(L, R)
        return out

    @property
    def residual_is_dense(self) -> bool:
        """Whether the base residual is cheaper to send dense (d·k) than as its factors (m·(d+k))."""
        if self.base_delta_factors is None:
            return False
        L, R = self.base_delta_factors
        d, m = L.shape
        k = R.shape[1]
        return d * k < m * (d + k)

    def residual_elements(self) -> int:
        """Elements needed to send the base residual: the cheaper of dense and factored (0 if none)."""
        if self.base_delta_factors is None:
            return 0
        L, R = self.base_delta_factors
        d, m = L.shape
        k = R.shape[1]
        return min(d * k, m * (d + k))

    def down_elements(self) -> int:
        """Elements the server sends each client for this matrix (``eval_B`` is never sent)."""
        n = self.residual_elements()
        if self.core is not None:
            n += self.core.numel()
        if self.B is not None and not self.frozen_B:
            n += self.B.numel()
        if self.A is not None and not self.frozen_A:
            n += self.A.numel()
        return n

    def down_bytes(self) -> int:
        """``down_elements()`` in bytes, at the dtype of the broadcast factors."""
        ref = self.A if self.A is not None else self.B
        size = ref.element_size() if ref is not None else torch.empty(0).element_size()
        return self.down_elements() * size
