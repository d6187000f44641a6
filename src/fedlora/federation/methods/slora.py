"""SLoRA (Babakniya et al. 2023): a sparse stage on a seeded index set, then a LoRA started from the SVD of what it
learned, trained as FedIT. Math: :mod:`fedlora.aggregation.slora`; the structure:
:func:`fedlora.adapters.structures.install_sparse`."""

import math

import torch

from fedlora.adapters.structures import install_sparse
from fedlora.aggregation import aggregate
from fedlora.aggregation.slora import DEFAULT_DENSITY, RESIDUALS, check_density, sparse_indices, support_seed, switch_init
from fedlora.federation.protocol import FOLD, SERVER_OPT_FACTORS, Method, Option, ServerUpdate, broadcast_trained, register

STAGE1_SHARE = 0.2  # R1 = ⌈0.2T⌉ by default (the reference code: 5 rounds)

_NOT_LORA = ("SLoRA's switch writes the rank-r SVD of the sparse update as LoRA factors with s·BA = [ΔW]_r; {} "
             "is not W0 + s·BA ({}); choose lora or rslora")


@register
class SLoRA(Method):
    """Stage 1 (rounds 1..R1): every adapted matrix has a fixed index set Ω, ``|Ω| = ⌈δdk⌉``, and a trainable
    ``v`` (zero at start): ``W = W0 + scatter_Ω(v)``, the LoRA factors frozen (B = 0: the LoRA path adds nothing).
    Clients train v and the head; the server averages them, ``v̄ = Σ w_u v_u`` (exact, linear). After round R1 the
    server takes ``ΔW = scatter_Ω(v̄)``, its rank-r SVD, and sends the LoRA start ``A = V_rᵀ``, ``B = U_rΣ_r/s`` once
    (r(d+k) per matrix) instead of v̄; every client and the server's model drop v, so the model is ``W0 + [ΔW]_r``.
    Stage 2 (rounds R1+1..T): FedIT.

    Choices where METHODS.md and the paper leave them open (our choice):

    - Ω is uniform without replacement, seeded by the run's seed and the module's name: the same for every client,
      round and process, so no indices travel (the reference draws a fresh Bernoulli(δ) mask per client and round).
      Options: ``density`` δ (default 0.01, the abstract's "~1 %"; the reference uses 0.0012) and ``stage1_rounds``
      R1 (default 0: ⌈0.2T⌉ of the run's ``--rounds``, set by :meth:`plan`; a run resumed with more rounds than it
      started with moves that default, so pass it explicitly there).
    - The SVD is exact (``torch.linalg.svd`` of the dense d×k ΔW in float64, once per matrix and run) and s is the
      adapter's own scale (α/r; α/√r for rsLoRA), not the reference's hard-coded 16/r. The kept energy
      ``‖[ΔW]_r‖²/‖ΔW‖²`` of every matrix is reported in the switch round's metrics (``slora_energy_per_layer``).
      ``residual`` = ``fold`` also folds ``ΔW − [ΔW]_r`` into the base (dense dk down, once); default ``drop``.
    - The switch round's v̄ is the plain average: a server optimiser (``--server-opt``) steps v in the rounds before
      it and the factors (FedIT's) after it; the SVD start is not a step (``untrained``).
    - The sparse delta is held by a forward hook beside PEFT's LoRA (:class:`~fedlora.adapters.structures.SparseDelta`);
      once the factors arrive it is switched off (v is zero). Export: before the switch the exported adapter is an
      exact LoRA of ``scatter_Ω(v) + s·BA`` (of whatever rank that needs: a 1 %-random sparse matrix is nearly full
      rank); after it, the plain rank-r LoRA.
    - Head trained and averaged in both stages. One rank for all clients; LoRA and rsLoRA.
    """

    name = "slora"
    async_refusal = "its switch to stage 2 is a barrier for all clients"
    title = "SLoRA (Babakniya et al., 2023)"
    rule = "slora"
    summary = ("rounds ≤ R1: v on a seeded sparse Ω of ⌈δdk⌉ entries, v̄ = Σ w_u v_u (exact); then LoRA from the rank-r SVD "
               "of scatter_Ω(v̄), trained as FedIT")
    up = "⌈δdk⌉ (rounds 1 to R1), r(d+k)"
    down = "⌈δdk⌉ (rounds before R1), r(d+k) (from the switch round on)"
    exactness = "stage 1 yes; then as FedIT"
    linear = True
    server_opt = SERVER_OPT_FACTORS  # v in stage 1, FedIT's factors in stage 2
    unsupported = {
        "dora": _NOT_LORA.format("DoRA", "its magnitude renormalises W0 + s·BA"),
        "vera": _NOT_LORA.format("VeRA", "its factors are fixed random projections"),
        "hira": _NOT_LORA.format("HiRA", "its update is W0 ⊙ s·BA"),
    }
    options = {
        "density": Option(DEFAULT_DENSITY, "SLoRA's share δ in (0, 1] of each adapted matrix's entries trained in stage 1 "
                                           "(|Ω| = ⌈δdk⌉)"),
        "stage1_rounds": Option(0, "SLoRA's sparse rounds R1 before the switch to LoRA (0: ⌈0.2·rounds⌉)"),
        "residual": Option("drop", "SLoRA at the switch: drop ΔW − [ΔW]_r, or fold it into the base (dense dk down, once)",
                           choices=RESIDUALS),
    }

    def __init__(self, **options):
        super().__init__(**options)
        try:
            check_density(self.settings["density"])
        except ValueError as exc:
            raise ValueError(f"option density={self.settings['density']!r} of method slora: {exc}; e.g. slora-density=0.01") from None
        if self.settings["stage1_rounds"] < 0:
            raise ValueError(f"option stage1_rounds={self.settings['stage1_rounds']} of method slora is negative; "
                             "pass 0 (⌈0.2·rounds⌉) or a number of rounds, e.g. slora-stage1-rounds=2")
        self.switch: int | None = self.settings["stage1_rounds"] or None

    def schedule(self, rounds, clients=0):
        if not self.settings["stage1_rounds"]:
            self.switch = max(1, math.ceil(STAGE1_SHARE * rounds))

    def stage(self, rnd: int) -> str:
        """``sparse`` (rounds before R1), ``switch`` (round R1: v trained, the LoRA start sent), ``lora`` (after)."""
        if self.switch is None:
            raise ValueError("slora's switch round is unknown until the run's rounds are given (Method.schedule); "
                             "build the run through the simulator, or pass slora-stage1-rounds")
        return "sparse" if rnd < self.switch else "switch" if rnd == self.switch else "lora"

    def comm_options(self, rnd):
        return {"stage": self.stage(rnd), "density": self.settings["density"], "residual": self.settings["residual"]}

    def prepare(self, model, spec, seed):
        density = self.settings["density"]
        install_sparse(model, lambda name, d, k: sparse_indices(d, k, density, support_seed(seed, name)))

    def frozen(self, h, rnd, peer=None):
        if self.stage(rnd) == "lora":
            return h.sparse_names()  # v is zero and dropped
        return h.B_names() + h.A_names()  # the LoRA factors wait for the switch

    def untrained(self, h, ctx):
        # The switch round's factors are the SVD start, not a step: a server optimiser leaves them alone.
        return set(h.B_names() + h.A_names()) if self.stage(ctx.number) == "switch" else set()

    def aggregate(self, h, uploads, weights, current, ctx):
        stage = self.stage(ctx.number)
        if stage == "lora":
            agg = self.combine(h, uploads, weights, current, ctx, stage="lora")
            update = broadcast_trained(h, agg, uploads, current, ctx, h.sparse_names())  # FedIT; v never goes down again
            update.notes = {"slora_stage": stage}
            return update
        layers, broadcast, energy = {}, {}, {}
        opts = {"stage": stage, "density": self.settings["density"], "residual": self.settings["residual"]}
        for module, k in h.keys.items():
            layer = aggregate(self.rule, [current[k.B]] * len(uploads), [current[k.A]] * len(uploads), weights, name=module,
                              values=[u[k.sparse] for u in uploads], **opts)
            layers[module] = layer
            v_bar = layer.info["values"]
            if stage == "sparse":
                broadcast[k.sparse] = v_bar
                continue
            s = h.scaling(module)
            B, A, energy[module], residual = switch_init(h.layers[module].sparse_delta.dense(v_bar), h.rank, s)
            broadcast[k.B], broadcast[k.A] = B.to(current[k.B].dtype), A.to(current[k.A].dtype)
            if self.settings["residual"] == "fold":
                broadcast[f"{module}.{FOLD}"] = residual / s  # h.fold adds s·Δ
        for n in h.other_names:  # the head (and any other shared trainable), averaged
            if all(n in u for u in uploads):
                broadcast[n] = sum(float(w) * u[n].to(torch.float64) for w, u in zip(weights, uploads)).to(current[n].dtype)
        notes = {"slora_stage": stage} | ({"slora_energy_per_layer": energy} if energy else {})
        return ServerUpdate(broadcast=broadcast, layers=layers, notes=notes)

    def take(self, h, delivered, current, peer, seed):
        out = super().take(h, delivered, current, peer, seed)
        if any(k.B in delivered for k in h.keys.values()) and h.sparse:  # the switch (or FedIT after it): v dropped
            for k in h.keys.values():
                out[k.sparse] = torch.zeros_like(current[k.sparse]) if current[k.sparse].any() else current[k.sparse]
            for layer in h.layers.values():
                layer.sparse_delta.off = True
        return out
