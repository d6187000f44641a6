"""FLoRA (Wang et al., NeurIPS 2024): stack every client's factors, fold the product into W0, re-initialise.
Math: :mod:`fedlora.aggregation.flora`."""

from fedlora.federation.protocol import FOLD_L, FOLD_R, SERVER_OPT_FOLD, Method, ServerUpdate, register, to_global


@register
class FLoRA(Method):
    """Stack every client's factors, fold B̂Â = Σ w_u s_u B_u A_u into W0, re-initialise the LoRA (exact).

    Mixed ranks: the stack is of the scaled factors (so α/r_u may differ between clients; the published code is
    only right because its clients use α = 2r), every client receives the same stack, and each re-initialises
    its LoRA at its own rank."""

    name = "flora"
    title = "FLoRA (Wang et al., NeurIPS 2024)"
    rule = "flora"
    server_opt = SERVER_OPT_FOLD
    summary = "stack B̂ = [B_1…B_U], Â = [w_1A_1;…;w_UA_U]; fold B̂Â into W0, re-init LoRA"
    down = "U·r(d+k)"
    exact = True
    mixed_ranks = True
    asynchronous = "exact"
    async_folds = True

    def async_rewrite(self, h, upload, start, current, *, mode, weight):
        """Clients restart from zero factors (B = 0), so a client's update is s·B_uA_u on its version's base: FedAsync
        folds α_t·s·B_uA_u (and the runner adds α_t(base_{v_u} − base_now)), FedBuff h(τ)·s·B_uA_u over the 1/K mean:
        B_u scaled by the weight, A_u as sent; other trainables (the head) mixed as any tensor."""
        factors = set(h.B_names()) | set(h.A_names())
        # Method's own rule, not super(): FLoRIST (no subclass) takes this hook as it is
        others = Method.async_rewrite(self, h, {n: t for n, t in upload.items() if n not in factors}, start, current, mode=mode, weight=weight)
        B = set(h.B_names())
        return others | {n: weight * t if n in B else t for n, t in upload.items() if n in factors}

    def aggregate(self, h, uploads, weights, current, ctx):
        agg = self.combine(h, uploads, weights, current, ctx)
        broadcast = dict(agg.others)
        for module, layer in to_global(h, agg.layers, ctx).items():
            # The stack is a factored base update, folded as s·B̂Â at the model's scale s (to_global put it over s).
            broadcast[f"{module}.{FOLD_L}"], broadcast[f"{module}.{FOLD_R}"] = layer.B, layer.A
        return ServerUpdate(broadcast=broadcast, layers=agg.layers, scales=ctx.scales)

    def deliver(self, h, broadcast, peer):
        return broadcast  # the same stack for everyone: each client re-initialises at its own rank

    def take(self, h, delivered, current, peer, seed):
        # Every client re-initialises from the same seed, so the fresh factors cost no bytes. After the fold:
        # DoRA's fresh magnitude is the norm of the new base weight.
        return super().take(h, delivered, current, peer, seed) | h.fresh_factors(seed, rank=peer.rank)
