"""FLoRA-NA (Nguyen et al., 2025): the best coefficient combination. Math: :mod:`fedlora.aggregation.florana`."""

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, register


@register
class FLoRANA(Method):
    """B̂ = Σ p_u B_u, Â = Σ q_u A_u with (p, q) minimising ‖ΔW* − B̂Â‖_F; FedIT's bytes."""

    name = "florana"
    async_refusal = "its solve is over clients that share one start"
    title = "FLoRA-NA (Nguyen et al., 2025)"
    rule = "florana"
    server_opt = SERVER_OPT_FACTORS
    summary = "B̂ = Σ p_u B_u, Â = Σ q_u A_u, (p, q) = argmin ‖ΔW* − B̂Â‖ (alternating solve: Gram space; above U·r = 256 CG without Grams)"
    exactness = "nearly"
    options = {"solver": Option("auto", "FLoRA-NA's solver: exact (Gram space, 8 random restarts), iterative (conjugate gradients without Grams, "
                                "linear in the number of clients), or auto (exact up to 256 stacked columns U·r)", ("auto", "exact", "iterative"),
                                to_rule=True)}
