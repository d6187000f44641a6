"""Fed-SB (LoRA-SB in federation; CERT-Lab/fed-sb): frozen shared B and A, clients train only the r×r core R.
Math: :mod:`fedlora.aggregation.fedsb`; the structure: :func:`fedlora.adapters.structures.install_core`."""

import torch

from fedlora.adapters.structures import basis_gain, install_core
from fedlora.aggregation import aggregate
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, ServerUpdate, register

SETUP_EXAMPLES = 64  # examples per client in the gradient estimate of round 0

_STRUCTURE = ("the trainable core sits between PEFT LoRA's B and A (lora_B(lora_A(x))); {} has other factors "
              "(DoRA: a magnitude normalisation of B·A; VeRA: λ vectors on shared projections; HiRA: W0 ⊙ B·A), "
              "so its forward would not be B·R·A; choose lora or rslora")


@register
class FedSB(Method):
    """``ΔW = s·B R A``: B (d×r) and A (r×k) frozen and identical on every client, only R (r×r, zero at start) trained
    and sent; the server averages this round's R (``R̄ = Σ w_u R_u``, exact) and every client takes R̄.

    Choices where METHODS.md leaves them open:

    - Initialisation without pooled data (``--fedsb-init``). ``gradient`` (default): LoRA-SB's init, estimated
      federatedly: in a round 0 every client sends the gradient of its loss with respect to each adapted W0 over
      its first 64 training examples (d·k per matrix, once), the server takes the top-r singular vectors of their
      weighted mean as the bases and sends them (r(d+k) per matrix, once); both counted in round 1's row. The
      reference estimates that gradient on all clients' pooled data, which no federation may do. ``random``:
      seeded orthonormal bases, the same in every process, no round 0 and no bytes (METHODS.md's fallback).
      Either way each basis is scaled by ``γ = (d/(3r))^{1/4}`` so one Adam step on R moves ΔW as far as one step
      on LoRA's B does (:func:`fedlora.adapters.structures.basis_gain`): one learning rate serves every method of a
      comparison. R starts at 0 (the reference's first-step R is for a centralised optimiser).
    - Round 1 trains R from zero against the bases (its gradient ``s·Bᵀ∇W Aᵀ`` is not zero), so no round is lost.
    - The classifier head is trained, sent and averaged as in FedIT (``--keep-head-local`` keeps it private).
    - Linear (the server needs only Σ w_u R_u: secure aggregation, DP). LoRA and rsLoRA; one rank for all clients.
    """

    name = "fedsb"
    title = "Fed-SB (Singhal et al., 2025; LoRA-SB)"
    rule = "fedsb"
    server_opt = SERVER_OPT_FACTORS
    summary = "B, A frozen shared bases; clients train R (r×r); R̄ = Σ w_u R_u (this round's only)"
    up = "r²"
    down = "r²"
    exact = True
    linear = True
    asynchronous = "exact"  # round 0 (a barrier) runs before the first dispatch
    unsupported = {kind: _STRUCTURE.format(name) for kind, name in (("dora", "DoRA"), ("vera", "VeRA"), ("hira", "HiRA"))}
    options = {"init": Option("gradient", "Fed-SB's bases: 'gradient' (top-r singular vectors of the clients' averaged "
                                          "gradient of W0, estimated in a round 0) or 'random' (seeded orthonormal, no round 0)",
                              choices=("gradient", "random"))}
    heads, gains = 1, False  # RAVAN: several r×r blocks, each with a trained scalar

    def prepare(self, model, spec, seed):
        install_core(model, rank=spec.r, heads=self.heads, gains=self.gains, seed=seed, method=self.name)

    def frozen(self, h, rnd):
        return h.B_names() + h.A_names()  # the bases: held by every client, never trained, never sent in a round

    # -- round 0 (init "gradient"): the LoRA-SB init, estimated federatedly ---------------------------------------
    def needs_setup(self):
        return self.settings.get("init") == "gradient"

    def setup_upload(self, h, task, train, cfg):
        """The gradient of the loss with respect to every adapted W0, over the client's first 64 training examples
        (dropout off), as ``{module}.grad`` (d×k each, also where the weight is stored k×d: GPT-2's Conv1D)."""
        weights = {m: layer.get_base_layer().weight for m, layer in h.layers.items()}
        grads = {m: torch.zeros_like(w) for m, w in weights.items()}
        n = min(len(train), SETUP_EXAMPLES)
        was_training = h.model.training
        h.model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        try:
            for start in range(0, n, cfg.batch_size):
                index = torch.arange(start, min(start + cfg.batch_size, n))
                loss = task.loss(h.model, train.batch(index, cfg.device)) * (len(index) / n)
                for m, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
                    grads[m] += g
        finally:
            for w in weights.values():
                w.requires_grad_(False)
            h.model.train(was_training)
        return {f"{m}.grad": h.base_layout(m, g).contiguous() for m, g in grads.items()}

    def setup_aggregate(self, h, uploads, weights, current):
        """Bases from the SVD of the averaged gradient G = Σ w_u G_u: B = γ·U_r, A = γ·V_rᵀ (γ as for the seeded
        bases), sent to every client once; the cores stay zero. A dense d×k SVD per matrix, once per run."""
        out = {}
        for module, k in h.keys.items():
            G = sum(float(w) * u[f"{module}.grad"].double() for w, u in zip(weights, uploads))
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            B0 = current[k.B]
            r = B0.shape[1]
            g = basis_gain(G.shape[0], 1, r)
            out[k.B], out[k.A] = (U[:, :r] * g).to(B0.dtype), (Vh[:r] * g).to(B0.dtype)
        return out

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
        # The averaged s_i·H_i are the next H_i and every s_i restarts at 1 (not sent); the bases every client holds.
        kept = set(h.gain_names()) | set(self.frozen(h, ctx.number))
        return ServerUpdate(broadcast={n: t for n, t in new.items() if n not in kept}, layers=layers)

    def core_options(self, cores):
        return {"cores": [c.reshape(c.shape[-2:]) if self.heads == 1 else c for c in cores]}

    def take(self, h, delivered, current, peer, seed):
        out = super().take(h, delivered, current, peer, seed)
        for g in h.gain_names():
            out[g] = torch.ones_like(current[g])
        return out
