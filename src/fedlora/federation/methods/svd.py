"""The rank-r optimum: broadcast the truncated SVD of ΔW*. Math: :mod:`fedlora.aggregation.svd`."""

from fedlora.federation.protocol import Method, register


@register
class SVD(Method):
    """B̂Â = [ΔW*]_r (truncated SVD of the ideal update, never formed densely). Mixed ranks: use flexlora."""

    name = "svd"
    title = "rank-r optimum (Eckart–Young)"
    rule = "svd"
    summary = "B̂Â = [ΔW*]_r via QR of stacked factors + SVD of a (Ur)² core"
    at_bound = True
    exactness = "at the Eckart–Young bound"
    unsupported = {"vera": "the rank-r optimum is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora"}
