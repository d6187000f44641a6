"""The rank-r optimum: broadcast the truncated SVD of ΔW*. Math: :mod:`fedlora.aggregation.svd`."""

from fedlora.federation.protocol import Method, Option, register

# The factor-space SVD's path (aggregation.svd), shared with flexlora.
SOLVER = Option("auto", "the SVD's path: exact (Gram core, exact to float64), randomized (range finder, linear in the number of clients, "
                "ρ within 1 part in 100 of the bound), or auto (exact up to 256 stacked columns U·r)", ("auto", "exact", "randomized"), to_rule=True)


@register
class SVD(Method):
    """B̂Â = [ΔW*]_r (truncated SVD of the ideal update, never formed densely). Mixed ranks: use flexlora."""

    name = "svd"
    title = "rank-r optimum (Eckart–Young)"
    rule = "svd"
    server_opt_refusal = "its result is a new rank-r basis every round (a truncated SVD), so per-factor optimiser state would have no fixed coordinates"
    summary = "B̂Â = [ΔW*]_r in factor space (a (Ur)² Gram core; above U·r = 256 a randomized range finder, linear in U)"
    at_bound = True
    exactness = "at the Eckart–Young bound"
    unsupported = {"vera": "the rank-r optimum is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora"}
    options = {"solver": SOLVER}
