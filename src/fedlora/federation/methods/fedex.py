"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's factors plus the residual folded into W0.
Math: :mod:`fedlora.aggregation.fedex`."""

from fedlora.federation.protocol import Method, fold_deltas, register, send_fold


@register
class FedEx(Method):
    """FedIT's factors plus the residual ΔW* − B̂Â folded into every client's frozen W0 (exact).

    HiRA (ΔW = W0 ⊙ BA): the kept B̂Â multiplies the folded base, so each client folds the residual R as
    ``W0 ⊙ R ⊘ (1 + B̂Â)`` (computed from the B̂, Â it received; nothing more is sent), which makes the weight
    ``W0 ⊙ (1 + ΔW*)`` exactly; the plain fold ``W0 ⊙ R`` would leave the cross term ``W0 ⊙ R ⊙ B̂Â``
    (``adapters.kinds.HiRA``)."""

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

    def fold(self, h, delivered):
        if not (deltas := fold_deltas(delivered)):
            return
        kept = None
        if h.kind.fold_sees_kept:  # the products the adapter keeps beside the fold: B̂Â, as the client will take them
            Bs, As = h.factors(delivered)
            kept = {m: Bs[m] @ As[m] for m in deltas if m in Bs and m in As}
        h.fold(deltas, kept)
