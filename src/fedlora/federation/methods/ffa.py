"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared seeded A0, only B trains and travels.
Math: :mod:`fedlora.aggregation.ffa`."""

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, broadcast_trained, register


@register
class FFA(Method):
    """A frozen at the shared seeded A0; only B trains and travels, so B̂A0 = Σ w_u B_u A0 exactly."""

    name = "ffa"
    title = "FFA-LoRA (Sun et al., ICLR 2024)"
    rule = "ffa"
    server_opt = SERVER_OPT_FACTORS
    summary = "A frozen at a shared seeded A0; B̂ = Σ w_u B_u"
    up = "dr"
    down = "dr"
    exact = True
    linear = True
    asynchronous = "exact"

    def frozen(self, h, rnd):
        return h.A_names()

    def aggregate(self, h, uploads, weights, current, ctx):
        agg = self.combine(h, uploads, weights, current, ctx)  # A: the shared A0 every client holds
        return broadcast_trained(h, agg, uploads, current, ctx, self.frozen(h, ctx.number))
