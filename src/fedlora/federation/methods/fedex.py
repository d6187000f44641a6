"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's factors plus the residual folded into W0.
Math: :mod:`fedlora.aggregation.fedex`."""

from fedlora.federation.protocol import Method, register, send_fold


@register
class FedEx(Method):
    """FedIT's factors plus the residual ΔW* − B̂Â folded into every client's frozen W0 (exact)."""

    name = "fedex"
    title = "FedEx-LoRA (Singhal et al., ACL 2025)"
    rule = "fedex"
    server_opt_refusal = "its residual fold is tied to the exact product of this round's averaged factors; stepping the factors would break its exactness"
    summary = "FedIT's B̂, Â; fold ΔW* − B̂Â into W0"
    down = "r(d+k) + min(dk, (U+1)r(d+k))"
    exact = True

    def aggregate(self, h, uploads, weights, current, ctx):
        update = super().aggregate(h, uploads, weights, current, ctx)
        for module, layer in update.layers.items():
            L, R = layer.base_delta_factors
            send_fold(update.broadcast, module, L, R)  # dense or factored, whichever is smaller
        return update
