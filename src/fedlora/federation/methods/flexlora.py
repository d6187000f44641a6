"""FlexLoRA (Bai et al., NeurIPS 2024): each client gets its own rank-r_u truncation of the SVD of ΔW*.
Math: :mod:`fedlora.aggregation.flexlora` (the factor-space SVD, never the dense d×k update)."""

from fedlora.federation.methods.svd import SOLVER, ProductDelta
from fedlora.federation.protocol import Method, register


@register
class FlexLoRA(ProductDelta, Method):
    """ΔW* = Σ w_u s_u B_u A_u; client u replaces its LoRA with [ΔW*]_{r_u} split as U Σ^{1/2}/√s_u, Σ^{1/2} Vᵀ/√s_u.

    The server keeps the rank-r_max truncation (the global model it scores); what each client receives is its
    truncation to r_u at its own scale: the base ``deliver`` does exactly that, because the truncation of an
    SVD split is the SVD split of the truncation. W0 never changes."""

    name = "flexlora"
    title = "FlexLoRA (Bai et al., NeurIPS 2024)"
    rule = "flexlora"
    server_opt_refusal = "its result is a new rank-r basis every round (a truncated SVD), so per-factor optimiser state would have no fixed coordinates"
    summary = "client u receives [ΔW*]_{r_u} (truncated SVD at its own rank, factor space)"
    up = "r_u(d+k)"
    down = "r_u(d+k)"
    at_bound = True
    exactness = "at the Eckart–Young bound at r_u"
    mixed_ranks = True
    unsupported = {"vera": "a truncated SVD is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora"}
    options = {"solver": SOLVER}
