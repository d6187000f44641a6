"""FedRot-LoRA (ICML 2026): each client rotates its factors toward the global ones before uploading; the server
runs FedIT. Math: :mod:`fedlora.aggregation.fedrot`."""

import math

from fedlora.aggregation.fedrot import procrustes_rotation, rotate, rotation_side
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, register


@register
class FedRot(Method):
    """Client u uploads (B_u R, Rᵀ A_u), R ∈ SO(r) the (soft) Procrustes rotation of one factor toward the global
    factor it started the round from — B in even rounds (M = B_refᵀ B_u), A in odd rounds from 3 (M = A_ref A_uᵀ),
    none in round 1 — so its update B_u A_u is unchanged; the server averages B and A separately (FedIT).

    Choices: ``lam`` (``--fedrot-lam``, default 0.5, in [0, 1]) is the soft rotation R′ = proj_SO(r)((1−λ)I + λR*),
    projected to the nearest rotation with the determinant sign fixed (the official code's hard mode, its default,
    may return a reflection; here R is a rotation unless ``reflect``); λ = 1 is the hard rotation, λ = 0 plain FedIT.
    ``reflect`` (``--fedrot-reflect``, default off; with λ = 1 only) is that official hard alignment over all of
    O(r): on a misalignment that is a reflection it lands on the reference exactly, where a rotation cannot. Round
    parity follows METHODS.md by default (B in round 2, A in round 3, …); ``--fedrot-first A`` gives the official
    code's order (0-based rounds with ``initialshare: A``: A in round 2). The order matters early: in round 2 B_ref
    is the small B of one round's training, and aligning B to it can rotate the clients' large, already aligned A
    apart (tiny BERT, 2 local steps, λ = 0.5: round-2 ρ 0.17 with B first, 0.031 with A first, FedIT 0.031).
    One rotation per adapted matrix, in float64, cast back to the factors' dtype. The reference is the client's own
    start (what it received); a client that starts from the same broadcast as the others (all of them, here) aligns
    to the same reference. Linear: the server needs only Σ w_u B_u R_u and Σ w_u R_uᵀ A_u, sums of what clients
    send (the rotation uses nothing but the client's own factors and the broadcast), so it is compatible with
    secure aggregation. Inexact (FedIT's cross terms remain, smaller when the clients' rank spaces are aligned).
    DoRA and HiRA are supported: DoRA's normalisation and HiRA's W0 ⊙ BA depend on the factors only through BA,
    which the rotation keeps; VeRA is not (its trainables are diagonal scalings, which a rotation does not keep)."""

    name = "fedrot"
    title = "FedRot-LoRA (ICML 2026)"
    rule = "fedrot"
    server_opt = SERVER_OPT_FACTORS
    summary = "clients upload (B_u R, Rᵀ A_u), R the soft Procrustes rotation of B (even rounds) or A (odd) toward the global factor; then FedIT"
    linear = True
    asynchronous = "inexact"  # a stale client rotates toward its own start x_{v_u}; B and A then mixed apart, as fedit
    unsupported = {"vera": "FedRot-LoRA rotates the rank space, and VeRA's λ vectors (diagonal scalings of frozen shared "
                           "projections) cannot be rotated; choose lora, rslora, dora or hira"}
    options = {
        "lam": Option(0.5, "FedRot-LoRA rotation strength λ in [0, 1]: R′ = proj_SO(r)((1−λ)I + λR*) (1: hard Procrustes, 0: FedIT)"),
        "first": Option("B", "FedRot-LoRA factor aligned in even rounds (the other in odd rounds from 3): B (METHODS.md) or A "
                        "(the official code's order)", ("B", "A")),
        "reflect": Option(False, "FedRot-LoRA alignment over all orthogonal matrices, reflections included (the official "
                                 "code's hard alignment, no determinant fix); needs fedrot-lam=1"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        lam = self.settings["lam"]
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(f"option lam={lam!r} of method fedrot must be in [0, 1]; pass e.g. fedrot-lam=0.5")
        if self.settings["reflect"] and lam != 1.0:
            raise ValueError(f"option reflect=True of method fedrot is the hard alignment, but lam is {lam!r}; pass fedrot-lam=1 "
                             "with it (a soft step toward a reflection passes through a singular matrix)")

    def upload(self, h, tensors, rnd, start=None):
        out = super().upload(h, tensors, rnd, start)
        side = rotation_side(rnd, self.settings["first"])
        if start is None or side is None or self.settings["lam"] == 0.0:  # the layout only, round 1, or no rotation
            return out
        Bs, As = h.factors(out)
        B_ref, A_ref = h.factors(start)
        for module, k in h.keys.items():
            if module not in Bs or module not in As:
                continue
            ref, mine = (A_ref[module], As[module]) if side == "A" else (B_ref[module], Bs[module])
            R = procrustes_rotation(ref, mine, side, lam=self.settings["lam"], reflect=self.settings["reflect"])
            out[k.B], out[k.A] = rotate(Bs[module], As[module], R)
        return out
