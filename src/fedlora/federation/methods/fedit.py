"""FedIT (Zhang et al., ICASSP 2024): average B and A separately. Math: :mod:`fedlora.aggregation.fedit`."""

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, register


@register
class FedIT(Method):
    """B̂ = Σ w_u B_u, Â = Σ w_u A_u (inexact: the mean of products is not the product of means). Under mixed
    ranks: segment averaging of the scaled factors √s_u B_u, √s_u A_u; client u receives its truncation."""

    name = "fedit"
    title = "FedIT (Zhang et al., ICASSP 2024)"
    rule = "fedit"
    server_opt = SERVER_OPT_FACTORS
    summary = "B̂ = Σ w_u B_u, Â = Σ w_u A_u (mixed ranks: segment averaging)"
    linear = True
    asynchronous = "inexact"
    mixed_ranks = True
