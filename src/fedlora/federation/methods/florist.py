"""FLoRIST (Ramesh & Dass, MLSys 2026): fold the energy-thresholded SVD of ΔW* into every client's base, restart a
fresh LoRA at each client's own rank. Math: :mod:`fedlora.aggregation.florist`."""

from fedlora.aggregation.florist import DEFAULT_TAU, check_tau
from fedlora.federation.methods.flora import FLoRA
from fedlora.federation.protocol import SERVER_OPT_FOLD, Method, Option, ServerUpdate, register, send_fold, to_global


@register
class FLoRIST(Method):
    """ΔW* = Σ w_u s_u B_u A_u and its factor-space SVD; every client and the server's model fold F = [ΔW*]_p, p the
    fewest components holding τ of the energy (option ``tau``, default 0.9), into the frozen base, and restart from
    a fresh LoRA at their own rank. Exact up to τ: ‖ΔW* − F‖/‖ΔW*‖ = √(1 − E_p) ≤ √(1 − τ); τ = 1 folds ΔW* (FLoRA).

    Choices where METHODS.md leaves them open:

    - Paper vs code: the abstract speaks of "global adapters shared by all clients"; the official code merges them
      into the model and every client builds a fresh LoRA on the merged model. We follow the code (what was
      evaluated, and the only reading in which clients keep their own ranks while p varies by layer and round):
      what goes down is the fold only, ``{module}.fold_L``/``fold_R`` = (U_pΣ_p^{1/2}, Σ_p^{1/2}V_pᵀ) or the dense
      ``{module}.fold`` when d·k is smaller, the same for every client, plus the averaged head; the tail beyond p
      is dropped. Nothing is sent for a matrix with p = 0 (ΔW* = 0).
    - The restart: PEFT's seeded init from the round's seed (``AdapterHandle.fresh_factors``, as FLoRA and FRLoRA
      here), the same on every client, at its own rank: no bytes.
    - Mixed ranks in the scaled product space (the official code's stacks carry no α/r_u and merge at the last
      client's scale, right only because its clients use α = 2r_u); the fold goes to the base at the model's scale.
    - The kept rank p and kept energy of every matrix go into the round's metrics (``florist_rank_per_layer``,
      ``florist_energy_per_layer``); bytes down depend on p, so the rule declares their largest value
      (p = min(U·r, d, k)) and the simulator counts what is sent.
    - Adapters: LoRA, rsLoRA and HiRA (its fold is W0 ⊙ F, applied by ``AdapterHandle.fold``; with B = 0 after the
      restart there is no cross term). Not linear: the SVD needs each client's factors.
    """

    name = "florist"
    title = "FLoRIST (Ramesh & Dass, MLSys 2026)"
    rule = "florist"
    summary = "fold F = [ΔW*]_p, p the fewest components holding τ of the energy (factor-space SVD), re-init LoRA at each client's rank"
    up = "r_u(d+k)"
    down = "min(dk, p(d+k)), p ≤ min(Ur,d,k) the kept rank"
    exactness = "up to the energy threshold τ"
    mixed_ranks = True
    server_opt = SERVER_OPT_FOLD  # its result is a fold into the base, as flora's
    unsupported = {
        "vera": "a fresh LoRA at each client's rank on a folded base is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; use lora, rslora or hira",
        "dora": "re-initialising DoRA re-derives its magnitude from the folded base, dropping the trained magnitude; use lora, rslora or hira",
    }
    options = {"tau": Option(DEFAULT_TAU, "FLoRIST energy threshold τ in (0, 1]: fold the fewest singular components of ΔW* "
                                          "holding τ of its energy (1: all of ΔW*, as flora)", to_rule=True)}

    asynchronous = "exact"  # up to τ, as synchronously: the fold is [target]_p of the full-parameter rule's target
    async_folds = True
    # Clients restart from fresh factors as flora's: B_u scaled by the weight makes ΔW* the rule's target (FedAsync
    # α_t·s·B_uA_u, the runner folding α_t(base_{v_u} − base_now) beside it; FedBuff (1/K)Σ h(τ)·s·B_uA_u).
    async_rewrite = FLoRA.async_rewrite

    def __init__(self, **options):
        super().__init__(**options)
        try:
            check_tau(self.settings["tau"])
        except ValueError as exc:
            raise ValueError(f"option tau={self.settings['tau']!r} of method florist: {exc}; e.g. florist-tau=0.9") from None

    def aggregate(self, h, uploads, weights, current, ctx):
        agg = self.combine(h, uploads, weights, current, ctx)
        broadcast = dict(agg.others)  # the averaged head; the fresh LoRA costs nothing
        for module, layer in to_global(h, agg.layers, ctx).items():
            if layer.base_delta_factors is not None:  # p = 0: nothing to fold
                L, R = layer.base_delta_factors
                send_fold(broadcast, module, L, R)  # dense or factored, whichever is smaller
        notes = {"florist_rank_per_layer": {m: a.info["kept_rank"] for m, a in agg.layers.items()},
                 "florist_energy_per_layer": {m: a.info["energy_kept"] for m, a in agg.layers.items()}}
        return ServerUpdate(broadcast=broadcast, layers=agg.layers, scales=ctx.scales, notes=notes)

    def deliver(self, h, broadcast, peer):
        return broadcast  # the same fold for everyone: each client restarts at its own rank

    def take(self, h, delivered, current, peer, seed):
        return super().take(h, delivered, current, peer, seed) | h.fresh_factors(seed, rank=peer.rank)
