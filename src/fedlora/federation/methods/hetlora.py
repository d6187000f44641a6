"""HetLoRA (Cho et al., EMNLP 2024): zero-padded, sparsity-weighted averaging of clients of different ranks.
Math: :mod:`fedlora.aggregation.hetlora`."""

import math

from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, register


@register
class HetLoRA(Method):
    """B_g = Σ ω_u pad(√s_u B_u), A_g = Σ ω_u pad(√s_u A_u), ω_u ∝ ‖s_u B_u A_u‖_F; client u receives
    (B_g[:, :r_u], A_g[:r_u]) / √s_u.

    Options: ``weights`` (``sparsity``, the paper's, or ``data``: w_u with segment renormalisation, linear in the
    uploads); ``lam`` and ``gamma``: the rank self-pruning regulariser ``λ ‖B_{:, p:}‖_F ‖A_{p:, :}‖_F`` with
    ``p = ⌈γ r_u⌉``, added to each client's loss on the parameters themselves, so it has a gradient (the
    reference computes it on ``.data`` and it does nothing). Off by default (λ = 0); trailing-rank pruning is
    not implemented."""

    name = "hetlora"
    title = "HetLoRA (Cho et al., EMNLP 2024)"
    rule = "hetlora"
    server_opt = SERVER_OPT_FACTORS
    summary = "zero-pad to r_max, B_g = Σ ω_u B_u, A_g = Σ ω_u A_u with ω_u ∝ ‖s_u B_u A_u‖ (or data weights); client u gets its first r_u"
    up = "r_u(d+k)"
    down = "r_u(d+k)"
    mixed_ranks = True
    asynchronous = "inexact"  # with data weights (__init__): A and B mixed apart, as fedit
    unsupported = {"vera": "HetLoRA pads and truncates factor ranks, which VeRA's shared projections fix; choose lora, rslora, dora or hira"}
    options = {
        "weights": Option("sparsity", "HetLoRA aggregation weights: sparsity (the paper's) or data", ("sparsity", "data")),
        "lam": Option(0.0, "HetLoRA rank self-pruning regulariser strength λ ≥ 0 (0: off)", interval="[0, inf)"),
        "gamma": Option(0.99, "HetLoRA regulariser: components from ⌈γ r_u⌉ on are penalised, γ in (0, 1] (the paper's "
                              "decay factor, below 1; 1 penalises nothing)", interval="(0, 1]"),
    }

    @classmethod
    def linear_text(cls) -> str:
        return "with data weights"

    @classmethod
    def async_text(cls) -> str:
        return "inexact (data weights)"

    def is_linear(self) -> bool:
        return self.settings["weights"] == "data"

    def __init__(self, **options):
        super().__init__(**options)
        self.rule_options = {"weighting": self.settings["weights"], **self.rule_options}
        if self.settings["weights"] != "data":  # METHODS.md: asynchronous with data weights only
            self.asynchronous = ""
            self.async_refusal = ("its sparsity weights ω_u ∝ ‖s_uB_uA_u‖ would weigh the rewritten stale mixes, not the "
                                  "clients' updates; pass hetlora-weights=data to run it asynchronously")

    def has_loss_term(self) -> bool:
        return self.settings["lam"] > 0 and self.settings["gamma"] < 1

    def loss_term(self, h, peer):
        lam = self.settings["lam"]
        if not lam:
            return None
        p = math.ceil(self.settings["gamma"] * peer.rank)
        if p >= peer.rank:
            return None
        total = 0.0
        for k in h.keys.values():
            B, A = h.parameter(k.B), h.parameter(k.A)
            total = total + B[:, p:peer.rank].norm() * A[p:peer.rank].norm()
        return lam * total
