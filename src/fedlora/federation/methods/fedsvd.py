"""FedSVD (Lee et al., NeurIPS 2025): clients train B against a frozen A; the server re-factors B̄A by its SVD.
Math: :mod:`fedlora.aggregation.fedsvd`."""

from fedlora.federation.protocol import Method, register


@register
class FedSVD(Method):
    """Clients train only B (A frozen, the same on every client); the server sends back ``B = U_r S_r`` and
    ``A = V_rᵀ`` from the SVD of ``(Σ w_u B_u) A``: exact, and the next round's frozen A has orthonormal rows.

    Only the hook that freezes A is the method's own: the base protocol already fills the A no client sent with the
    one every client holds, writes both new factors and broadcasts them, and clients take them (and keep the new A
    frozen next round)."""

    name = "fedsvd"
    async_refusal = "A is re-based every step from all clients' B"
    title = "FedSVD (Lee et al., NeurIPS 2025)"
    rule = "fedsvd"
    server_opt_refusal = "it re-bases A every round (an SVD of the product), so per-factor optimiser state would have no fixed coordinates"
    summary = "A frozen; B̄ = Σ w_u B_u; B̄A = U S Vᵀ (QRs + r×r SVD, never d×k); send A = V_rᵀ, B = U_r S_r"
    up = "dr"
    down = "r(d+k)"
    exact = True
    linear = True
    unsupported = {"vera": "VeRA's A is its frozen shared random projection scaled by λ_d, and FedSVD replaces A with "
                           "V_rᵀ, which is not of that form; choose lora, rslora, dora or hira"}

    def frozen(self, h, rnd):
        return h.A_names()
