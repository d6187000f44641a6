"""FLoRA-NA (Nguyen et al., 2025): the best coefficient combination. Math: :mod:`fedlora.aggregation.florana`."""

from fedlora.federation.protocol import Method, register


@register
class FLoRANA(Method):
    """B̂ = Σ p_u B_u, Â = Σ q_u A_u with (p, q) minimising ‖ΔW* − B̂Â‖_F; FedIT's bytes."""

    name = "florana"
    title = "FLoRA-NA (Nguyen et al., 2025)"
    rule = "florana"
    summary = "B̂ = Σ p_u B_u, Â = Σ q_u A_u, (p, q) = argmin ‖ΔW* − B̂Â‖ (exact alternating solve in Gram space)"
    exactness = "nearly"
