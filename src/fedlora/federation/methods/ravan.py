"""RAVAN (Raje et al., NeurIPS 2025): h heads ``s_i B_i H_i A_i`` with frozen seeded bases; clients train the r×r
``H_i`` and the scalars ``s_i``. Math: :mod:`fedlora.aggregation.ravan`. The protocol is Fed-SB's with h gained
blocks (:class:`~fedlora.federation.methods.fedsb.FedSB`)."""

import torch

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
    asynchronous = "exact"  # the bases never change, so a stale product s_i·H_i meets the same B, A

    def async_rewrite(self, h, upload, start, current, *, mode, weight):
        """The effective cores s_i·H_i mixed, not H_i and s_i apart (whose mix is not the mix of ΔW): each upload's
        ``H_i`` becomes FedAsync's (1−α_t)H_i + α_t·s_{i,u}H_{i,u}, FedBuff's H_i + h(τ)(s_{i,u}H_{i,u} − H_{i,v_u})
        (the server's and the starts' s_i are 1: clients restart them there), with its s_i sent as 1 (so the
        rule's product is that mix); the head as any tensor. The upload's bytes are those sent (same shapes)."""
        cores = {k.core: h.core_of(upload, m) for m, k in h.keys.items() if k.core in upload}
        gains = {k.gain: torch.ones_like(upload[k.gain]) for k in h.keys.values() if k.gain and k.gain in upload}
        mixed = super().async_rewrite(h, {n: t for n, t in upload.items() if n not in gains} | cores, start, current,
                                      mode=mode, weight=weight)
        return mixed | gains

    def __init__(self, **options):
        super().__init__(**options)
        if self.settings["heads"] < 1:
            raise ValueError(f"ravan-heads={self.settings['heads']} is below 1; pass at least one head, e.g. --ravan-heads 4")
        self.heads = self.settings["heads"]

    def core_options(self, cores):
        return {"cores": cores, "heads": self.heads}
