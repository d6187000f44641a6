"""FedMomentum (Yan et al., 2026): the rank-r truncated SVD of ΔW* as the new LoRA, the next components up to an
energy threshold τ folded into every client's base. Math: :mod:`fedlora.aggregation.fedmomentum`."""

from fedlora.aggregation.fedmomentum import check_tau
from fedlora.federation.methods.svd import ProductDelta
from fedlora.federation.protocol import Method, Option, register, send_fold


@register
class FedMomentum(ProductDelta, Method):
    """ΔW* = Σ w_u B_u A_u and its factor-space SVD; every client replaces its LoRA with the top r components split
    as U_r Σ_r^{1/2}, Σ_r^{1/2} V_rᵀ, and folds the components after them, until the cumulative energy reaches
    τ‖ΔW*‖² (option ``tau``, default 0.9999), into its frozen base; the rest is dropped.

    Choices where METHODS.md leaves them open: the fold goes to every client (and the server's model) as a generic
    base-weight update ``{module}.fold_L``/``fold_R`` (or the dense ``{module}.fold`` when d·k is smaller than its
    f(d+k) factors, as FedEx-LoRA's residual), folded at the model's scale s = α/r by ``AdapterHandle.fold`` (the
    public code folds without α/r); nothing is sent when the top r components already reach τ. "Energy" is the
    squared Frobenius norm, counted from the first component: the fold is the shortest run of components after the
    first r that brings the total to τ. With τ = 1 every numerically non-zero component is kept (exact). When ΔW*
    has fewer than r non-zero components the LoRA is zero-padded. One rank for all clients (no mixed ranks).
    HiRA is not offered: its update W0 ⊙ BA is multiplied by the folded base, so the new LoRA and the fold would
    leave a cross term W0 ⊙ F ⊙ B̂Â that the threshold does not account for."""

    name = "fedmomentum"
    title = "FedMomentum (Yan et al., 2026)"
    rule = "fedmomentum"
    server_opt_refusal = "its fold is tied to the exact product and it keeps a momentum of its own"
    summary = "[ΔW*]_r as the new LoRA (factor-space SVD); fold the next components up to energy τ into W0"
    down = "r(d+k) + min(dk, f(d+k)), f ≤ min(Ur,d,k) − r the folded rank"
    exact = False
    exactness = "up to the energy threshold τ"
    unsupported = {
        "vera": "a truncated SVD is not of VeRA's diag(λ_b)·B·diag(λ_d)·A form; choose fedit, florana, fedex or flora",
        "hira": "HiRA's W0 ⊙ BA is multiplied by the folded base, leaving a cross term W0 ⊙ F ⊙ B̂Â; use lora or rslora",
        "dora": "not tested with DoRA's magnitude normalisation of W0 + sBA; use lora or rslora",
    }
    options = {"tau": Option(0.9999, "FedMomentum energy threshold τ in [0, 1]: fold components after the first r until "
                                     "their cumulative energy reaches τ of ‖ΔW*‖² (1: exact)")}

    def __init__(self, **options):
        super().__init__(**options)
        self.rule_options = {"tau": check_tau(self.settings["tau"]), **self.rule_options}

    def aggregate(self, h, uploads, weights, current, ctx):
        update = super().aggregate(h, uploads, weights, current, ctx)  # B̂, Â and the averaged head
        for module, layer in update.layers.items():
            if layer.base_delta_factors is None:
                continue  # the top r components already reach τ: nothing to fold
            L, R = layer.base_delta_factors
            send_fold(update.broadcast, module, L, R)  # dense or factored, whichever is smaller
        return update
