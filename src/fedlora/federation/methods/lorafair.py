"""LoRA-FAIR (Bian et al., ICCV 2025): FedIT's means with B corrected toward the ideal update, and clients restart
from the corrected pair. Math: :mod:`fedlora.aggregation.lorafair`."""

import math

from fedlora.aggregation.lorafair import DEFAULT_LAM
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, register


@register
class LoRAFAIR(Method):
    """Ā = Σ w_u A_u, B̄ = Σ w_u B_u, then B̄′ = B̄ + ΔB with ΔB = argmin ‖ΔW* − (B̄ + ΔB)Ā‖_F² + λ‖ΔB‖_F²
    = (ΔW* − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹, computed in the r×r Gram space (never d×k). Every client trains A and B and starts
    its next round from the broadcast (B̄′, Ā); the head and other non-factor trainables are averaged.

    Choices (the paper publishes no code): the residual is measured in the Frobenius norm (the paper describes a
    "cosine-like" similarity), with an absolute ridge strength ``lam`` (option ``--lorafair-lam``, default 1e-3,
    small against ĀĀᵀ's eigenvalues, about 1/3 at PEFT's initialisation); λ = 0 gives the exact projection
    ``B̄′Ā = ΔW* P_Ā`` (pseudo-inverse when Ā is rank-deficient). With any λ ≥ 0 the round's ρ is never above
    FedIT's. Inexact: the broadcast has rank r and keeps FedIT's Ā. Not linear: ΔW*Āᵀ = Σ w_u B_u (A_u Āᵀ) needs
    each client's factors. DoRA: the correction acts on the LoRA product BA that DoRA normalises, the magnitude
    vectors are averaged; HiRA (ΔW = W0 ⊙ BA): the correction minimises the residual of BA, i.e. the ρ reported
    here, not the W0-weighted residual of the effective update. VeRA: unsupported."""

    name = "lorafair"
    async_refusal = "its correction is solved over clients that share one start"
    title = "LoRA-FAIR (Bian et al., ICCV 2025)"
    rule = "lorafair"
    server_opt = SERVER_OPT_FACTORS
    summary = "FedIT's Ā; B̄′ = B̄ + ΔB, ΔB = argmin ‖ΔW* − (B̄ + ΔB)Ā‖² + λ‖ΔB‖² (r×r ridge); clients restart from (B̄′, Ā)"
    unsupported = {"vera": "LoRA-FAIR's corrected B̄ + ΔB is not of VeRA's diag(λ_b)·B form over its frozen shared B; choose lora, rslora, dora or hira"}
    options = {"lam": Option(DEFAULT_LAM, "LoRA-FAIR ridge strength λ of the B correction, ≥ 0 (0: the exact projection onto Ā's row space)")}

    def __init__(self, **options):
        super().__init__(**options)
        lam = self.settings["lam"]
        if not (math.isfinite(lam) and lam >= 0.0):
            raise ValueError(f"option lam={lam!r} of method lorafair must be a finite number ≥ 0; pass e.g. lorafair-lam={DEFAULT_LAM}")
        self.rule_options = {"lam": lam, **self.rule_options}
