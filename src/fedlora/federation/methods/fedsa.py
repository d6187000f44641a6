"""FedSA-LoRA (Guo et al., ICLR 2025): only A is shared; each client keeps its B (and head).
Math: :mod:`fedlora.aggregation.fedsa`."""

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, ServerUpdate, register, to_global


@register
class FedSA(Method):
    """Only A is shared (Â = Σ w_u A_u; mixed ranks: segment averaging); each client keeps its own B and, by
    default, its head. The global model scored is Â with the clients' mean B and heads (never sent)."""

    name = "fedsa"
    title = "FedSA-LoRA (Guo et al., ICLR 2025)"
    rule = "fedsa"
    server_opt = SERVER_OPT_FACTORS
    summary = "Â = Σ w_u A_u; each client keeps its B (and head)"
    up = "rk"
    down = "rk"
    exactness = "personalised"
    personalised = True
    linear = True
    asynchronous = "inexact"
    mixed_ranks = True
    keeps_head_local = True

    def private(self, h):
        return h.B_names() + super().private(h)

    def eval_extras(self, h, tensors):
        return {n: tensors[n] for n in self.private(h)}

    def aggregate(self, h, uploads, weights, current, ctx):
        # Clients' B (and local heads) reach the server as ``eval_extras``, only to score a global model: the
        # broadcast does not carry them and bytes up count only what ``upload`` returned.
        agg = self.combine(h, uploads, weights, current, ctx)
        private = set(self.private(h))
        layers = to_global(h, agg.layers, ctx)
        new = dict(current) | {n: t for n, t in agg.others.items() if n not in private}
        h.write_factors(layers, uploads, new, B=False)
        evaluation = dict(new) | agg.others
        for module, layer in layers.items():
            # The clients' mean B as the kind writes it: the rule's eval_B (None: no client reported its B, and the
            # global model is scored with the server's own); VeRA: the clients' λ_b averaged with the data weights.
            name = h.keys[module].B
            if (mean_B := h.kind.write(h, name, layer.eval_B, uploads, weights)) is not None:
                evaluation[name] = mean_B
        broadcast = {n: t for n, t in new.items() if n not in private}
        return ServerUpdate(broadcast=broadcast, eval_tensors=evaluation, layers=agg.layers, scales=ctx.scales)
