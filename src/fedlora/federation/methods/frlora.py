"""FRLoRA (Yan et al., ICLR 2025): fold FedIT's update into the base of the global model and every client, then
re-initialise the LoRA. Math: :mod:`fedlora.aggregation.frlora`."""

from fedlora.federation.protocol import SERVER_OPT_FOLD, Method, ServerUpdate, register, send_fold


@register
class FRLoRA(Method):
    """B̄ = Σ w_u B_u, Ā = Σ w_u A_u; every client (and the server's model) folds B̄Ā into its frozen base at the
    model's scale s and re-initialises its LoRA; the head is averaged and taken as usual.

    Choices where METHODS.md leaves them open:

    - Re-initialisation: PEFT's seeded init (A Kaiming-uniform, B = 0; ``AdapterHandle.fresh_factors`` with the
      round's seed, the same on every client, so it costs no bytes), not the paper's principal-SVD init of the
      current W. The paper's init needs a d×k SVD of every adapted weight per round on every client
      (O(dk·min(d,k)), or O(dkr) randomised, against this rule's O(U·r(d+k))), a second fold (W_res = W − B_0A_0)
      and bit-identical singular vectors on every client (signs and ties differ across BLAS builds) for the
      clients to share one start; PEFT's init is free and deterministic. So B_0 = 0 at the start of every round.
    - The fold: B̄Ā, which is the paper's B̄Ā − B_0A_0 since B_0 = 0. (For a non-zero start the base must receive
      B̄Ā: the round's update B̄Ā − B_0A_0 plus the B_0A_0 the re-init removes from the LoRA; see the math module.)
    - What goes down: the fold only, as ``{module}.fold_L``/``fold_R`` = (B̄, Ā) (rank ≤ r) or the dense
      ``{module}.fold`` when d·k is smaller, plus the averaged head. B̄ and Ā themselves are not sent: every client
      discards its LoRA after the fold and re-initialises from the shared seed.
    - Linear: the server needs only Σ w_u B_u and Σ w_u A_u (compatible with secure aggregation).
    - Adapters: LoRA, rsLoRA and HiRA (its fold is W0 ⊙ B̄Ā, applied by ``AdapterHandle.fold``; with B = 0 after
      the re-init there is no cross term). One rank for all clients.
    """

    name = "frlora"
    title = "FRLoRA (Yan et al., ICLR 2025)"
    rule = "frlora"
    server_opt = SERVER_OPT_FOLD
    summary = "fold FedIT's B̄Ā into W0 on every client, re-init LoRA (PEFT's seeded init)"
    down = "min(dk, r(d+k))"
    exact = False
    linear = True
    # --async: fedit's separate mixes of the fresh factors are folded (inexact); clients restart from zero, so a stale
    # client trains on its version's base and FedAsync also folds α_t(base_{v_u} − base_now), as flora
    asynchronous = "inexact"
    async_folds = True
    unsupported = {
        "vera": "not offered: the fold of VeRA's diag(λ_b)·B·diag(λ_d)·A factors and its re-init are untested; use lora, rslora or hira",
        "dora": "re-initialising DoRA re-derives its magnitude from the folded base, dropping the trained magnitude; use lora, rslora or hira",
    }

    def aggregate(self, h, uploads, weights, current, ctx):
        agg = self.combine(h, uploads, weights, current, ctx)
        broadcast = dict(agg.others)  # the averaged head; B̄, Ā go down only as the fold
        for module, layer in agg.layers.items():
            L, R = layer.base_delta_factors
            send_fold(broadcast, module, L, R)  # dense or factored, whichever is smaller
        return ServerUpdate(broadcast=broadcast, layers=agg.layers, scales=ctx.scales)

    def take(self, h, delivered, current, peer, seed):
        # The head from the broadcast, then a fresh LoRA from the round's seed (the same on every client).
        return super().take(h, delivered, current, peer, seed) | h.fresh_factors(seed, rank=peer.rank)
