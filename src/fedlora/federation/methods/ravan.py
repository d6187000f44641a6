"""RAVAN (Raje et al., NeurIPS 2025): h heads ``s_i B_i H_i A_i`` with frozen seeded bases; clients train the r×r
``H_i`` and the scalars ``s_i``. Math: :mod:`fedlora.aggregation.ravan`. The protocol is Fed-SB's with h gained
blocks (:class:`~fedlora.federation.methods.fedsb.FedSB`)."""

from fedlora.federation.methods.fedsb import FedSB
from fedlora.federation.protocol import Option, register


@register
class RAVAN(FedSB):
    """``ΔW = s·Σ_i s_i B_i H_i A_i``: the stacked bases ``B = [B_1 … B_h]`` (d×hr) and ``A`` (hr×k) are frozen,
    seeded and the same on every client; ``H_i`` start at zero, ``s_i`` at one. The server averages the products
    ``s_i H_i`` (exact: ``Σ_u w_u ΔW_u = B·blockdiag(Σ_u w_u s_{i,u}H_{i,u})·A``); clients take them as the next
    ``H_i`` and restart every ``s_i`` at 1, so only the h·r² averaged entries go down.

    Choices where the paper leaves them open (METHODS.md):

    - Head count: ``--ravan-heads`` (default 4), each head of rank ``--rank``; ``heads·rank`` must not exceed the
      smaller side of an adapted matrix.
    - Basis scaling: orthonormal columns of B and rows of A across all heads (one QR of a seeded Gaussian per
      layer), each times ``γ = (d/(3hr))^{1/4}`` (:func:`fedlora.adapters.structures.basis_gain`): the update then
      does not grow with √(dk) as unit Gaussian bases would make it, and one Adam step on the H_i moves ΔW as far
      as one step on LoRA's B does, so one learning rate serves every method in a comparison.
    - The layer: a module swap inside PEFT's LoRA layer (``lora_A`` holds A, ``lora_B`` becomes the heads and B),
      so it targets whatever ``--target-modules`` names (``query``/``value`` on BERT, ``q_proj``/``v_proj`` on Llama).
    """

    name = "ravan"
    title = "RAVAN (Raje et al., NeurIPS 2025)"
    rule = "ravan"
    summary = "h heads s_i B_i H_i A_i, bases frozen; clients train H_i, s_i; server averages s_i H_i per head"
    up = "h(r²+1)"
    down = "h·r²"
    options = {"heads": Option(4, "RAVAN's number of heads h (each of rank --rank; h·rank ≤ the smaller side of a layer)", to_rule=True)}
    gains = True
    asynchronous = ""  # exact in METHODS.md, but its s_i·H_i products need their own mix: not implemented yet

    def __init__(self, **options):
        super().__init__(**options)
        if self.settings["heads"] < 1:
            raise ValueError(f"ravan-heads={self.settings['heads']} is below 1; pass at least one head, e.g. --ravan-heads 4")
        self.heads = self.settings["heads"]

    def core_options(self, cores):
        return {"cores": cores, "heads": self.heads}
