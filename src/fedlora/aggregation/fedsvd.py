"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025;
official code seanie12/fed-svd).

Clients train only B; A is frozen and the same on every client (the one the server sent last round; round 1:
the shared seeded init). The server averages ``B̄ = Σ w_u B_u`` and re-factors the product by its SVD,
``B̄A = U S Vᵀ`` (rank ≤ r), sending ``A = V_rᵀ`` (orthonormal rows) and ``B = U_r S_r``:

    B_new A_new = U_r S_r V_rᵀ = B̄ A = Σ w_u B_u A      (exact, as FFA-LoRA's average is)
    A_new A_newᵀ = I_r

The SVD never forms the d×k product (the reference runs a dense SVD of it per layer): with Householder QRs
``B̄ = Q_B R_B`` (d×r) and ``Aᵀ = Q_A R_A`` (k×r), ``B̄A = Q_B (R_B R_Aᵀ) Q_Aᵀ``, and the SVD of the r×r core
``R_B R_Aᵀ = U_c S V_cᵀ`` gives ``U = Q_B U_c``, ``V = Q_A V_c``. A need not be orthonormal (round 1's is not);
Q_A is, so the new A has orthonormal rows even where B̄A has rank below r (its extra rows span the rest of A's
row space, with zero singular values: B's matching columns are zero). Float64 throughout, cast back to the uploads'
dtype. O((d+k)r² + r³).

Up: ``dr`` (B only); down: ``r(d+k)`` (both factors change). Linear in the uploads: the server needs only Σ w_u B_u.
The paper's point is differential privacy: only B is noised, and an A with orthonormal rows does not amplify the
noise in the product (σ_max(A) = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _where, combine, shared_factor
from .registry import register_rule
from .result import Aggregate


def _comm(d: int, k: int, r: int, U: int) -> tuple[int, int]:
    return d * r, r * (d + k)  # only B goes up; the re-factored B and A both come down


def svd_refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r S_r, V_rᵀ, S)`` with ``B A = U S Vᵀ`` (B d×r, A r×k, r ≤ k), in float64: QRs of B and Aᵀ and an SVD of
    the (≤ r)×r core, never the d×k product. The new A has orthonormal rows; the new B is zero-padded to r
    columns when d < r. O((d+k)r² + r³)."""
    r = B.shape[1]
    QB, RB = torch.linalg.qr(B.to(torch.float64))  # d×m, m×r with m = min(d, r)
    QA, RA = torch.linalg.qr(A.to(torch.float64).T)  # k×r, r×r (r ≤ k)
    Uc, S, Vch = torch.linalg.svd(RB @ RA.T)  # full: m×m, m, r×r (V_c orthogonal, so V_cᵀQ_Aᵀ is orthonormal)
    B_new = QB @ (Uc * S)  # U_r S_r, d×m
    if B_new.shape[1] < r:
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], r - B_new.shape[1])], dim=1)
    return B_new, Vch @ QA.T, S


@register_rule("fedsvd", comm=_comm)
def fedsvd(Bs: list[Tensor], As: list[Tensor], w: Tensor, *, name: str | None = None) -> Aggregate:
    A = shared_factor(As, "A", name, "FedSVD freezes A at the one the server sent last round; send every client the same A")
    r, k = A.shape
    if r > k:
        raise ValueError(f"A{_where(name)} is {r}×{k}: FedSVD's new A has r orthonormal rows of length k, which needs r ≤ k; lower the rank")
    dtype = A.dtype
    B_bar = combine(Bs, w, torch.float64)
    B_new, A_new, S = svd_refactor(B_bar, A)
    return Aggregate(method="fedsvd", B=B_new.to(dtype), A=A_new.to(dtype), info={"singular_values": S})
