"""Fed-SB (LoRA-SB in federation; CERT-Lab/fed-sb): frozen shared B and A, clients train only the r×r core R.
Math: :mod:`fedlora.aggregation.fedsb`; the structure: :func:`fedlora.adapters.structures.install_core`."""

import torch

from fedlora.adapters.structures import install_core
from fedlora.aggregation import aggregate
from fedlora.federation.protocol import Method, ServerUpdate, register

_STRUCTURE = ("the trainable core sits between PEFT LoRA's B and A (lora_B(lora_A(x))); {} has other factors "
              "(DoRA: a magnitude normalisation of B·A; VeRA: λ vectors on shared projections; HiRA: W0 ⊙ B·A), "
              "so its forward would not be B·R·A; choose lora or rslora")


@register
class FedSB(Method):
    """``ΔW = s·B R A``: B (d×r) and A (r×k) frozen and identical on every client, only R (r×r, zero at start) trained
    and sent; the server averages this round's R (``R̄ = Σ w_u R_u``, exact) and every client takes R̄.

    Choices where METHODS.md leaves them open:

    - Initialisation without pooled data: seeded orthonormal B, A (the same in every process: no bytes) with
      R = 0, METHODS.md's federated fallback; each basis is scaled by ``γ = (d/(3r))^{1/4}`` so one Adam step on R
      moves ΔW as far as one step on LoRA's B does (:func:`fedlora.adapters.structures.basis_gain`), and one
      learning rate serves every method of a comparison. The reference's gradient-SVD init estimates the gradient
      on all clients' pooled data, which no federation may do; a federated estimate (round 0) is not built yet.
    - Round 1 trains R from zero against the bases (its gradient ``s·Bᵀ∇W Aᵀ`` is not zero), so no round is lost.
    - The classifier head is trained, sent and averaged as in FedIT (``--keep-head-local`` keeps it private).
    - Linear (the server needs only Σ w_u R_u: secure aggregation, DP). LoRA and rsLoRA; one rank for all clients.
    """

    name = "fedsb"
    title = "Fed-SB (Singhal et al., 2025; LoRA-SB)"
    rule = "fedsb"
    summary = "B, A frozen shared bases; clients train R (r×r); R̄ = Σ w_u R_u (this round's only)"
    up = "r²"
    down = "r²"
    exact = True
    linear = True
    unsupported = {kind: _STRUCTURE.format(name) for kind, name in (("dora", "DoRA"), ("vera", "VeRA"), ("hira", "HiRA"))}
    heads, gains = 1, False  # RAVAN: several r×r blocks, each with a trained scalar

    def prepare(self, model, spec, seed):
        install_core(model, rank=spec.r, heads=self.heads, gains=self.gains, seed=seed, method=self.name)

    def aggregate(self, h, uploads, weights, current, ctx):
        layers = {}
        for module, k in h.keys.items():
            B, A = h.parameter(k.B).detach(), h.parameter(k.A).detach()
            cores = [h.core_of(u, module) for u in uploads]
            layers[module] = aggregate(self.rule, [B] * len(uploads), [A] * len(uploads), weights, name=module,
                                       **self.core_options(cores))
        new = dict(current)
        for n in h.other_names:  # the head (and any other shared trainable), where every client sent it
            if all(n in u for u in uploads):
                new[n] = sum(float(w) * u[n] for w, u in zip(weights, uploads)).to(current[n].dtype)
        for module, agg in layers.items():
            new[h.keys[module].core] = agg.core.to(current[h.keys[module].core].dtype).reshape(current[h.keys[module].core].shape)
        gains = set(h.gain_names())  # the averaged s_i·H_i are the next H_i; every s_i restarts at 1 (not sent)
        return ServerUpdate(broadcast={n: t for n, t in new.items() if n not in gains}, layers=layers)

    def core_options(self, cores):
        return {"cores": [c.reshape(c.shape[-2:]) if self.heads == 1 else c for c in cores]}

    def take(self, h, delivered, current, peer, seed):
        out = super().take(h, delivered, current, peer, seed)
        for g in h.gain_names():
            out[g] = torch.ones_like(current[g])
        return out
