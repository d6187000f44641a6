"""RoLoRA (Chen et al., NeurIPS 2025): rounds alternate between training and sending only B and only A.
Math: :mod:`fedlora.aggregation.rolora`."""

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, broadcast_trained, register


@register
class RoLoRA(Method):
    """Odd rounds train and send only B (A frozen), even rounds only A (B frozen); the server averages the factor
    trained that round and keeps the other, so every round is exact. Round 1 is a B-round: B starts at zero, and A
    trained against B = 0 learns nothing. Every client starts the round from the global factors (the simulator
    loads each client's whole start state; FedLLM-Factory chains the trained factor from one client to the next).
    The head and other non-factor trainables train every round and are averaged, as in FedIT."""

    name = "rolora"
    async_refusal = "it alternates which factor every client trains, one phase for all"
    title = "RoLoRA (Chen et al., NeurIPS 2025)"
    rule = "rolora"
    server_opt = SERVER_OPT_FACTORS
    summary = "alternating: odd rounds train B (A frozen), B̂ = Σ w_u B_u; even rounds train A (B frozen), Â = Σ w_u A_u"
    up = "dr (B-rounds), rk (A-rounds)"
    down = "dr (B-rounds), rk (A-rounds)"
    exact = True
    linear = True

    @staticmethod
    def trained(rnd: int) -> str:
        """The factor round ``rnd`` trains and sends: B in odd rounds (round 1 first), A in even ones."""
        return "B" if rnd % 2 == 1 else "A"

    def frozen(self, h, rnd):
        return h.A_names() if self.trained(rnd) == "B" else h.B_names()

    def comm_options(self, rnd):
        return {"trained": self.trained(rnd)}

    def aggregate(self, h, uploads, weights, current, ctx):
        # The frozen factor reaches the rule as the shared start; only the trained one is written and broadcast.
        agg = self.combine(h, uploads, weights, current, ctx, trained=self.trained(ctx.number))
        return broadcast_trained(h, agg, uploads, current, ctx, self.frozen(h, ctx.number))
