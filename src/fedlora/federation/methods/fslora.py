"""FSLoRA (Fang et al., arXiv 2501.19389): each client trains a seeded sketch of the global adapter.
Math: :mod:`fedlora.aggregation.fslora`."""

import math

import torch

from fedlora.aggregation import Aggregate, aggregate
from fedlora.aggregation.fslora import sketch_indices, sketch_seed
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, ServerUpdate, register


@register
class FSLoRA(Method):
    """The server keeps the global (B, A) at rank r (``--rank``); client u has a sketch size k_u ≤ r
    (``--client-ranks`` read as sketch sizes; without it k_u = ⌈r/2⌉, our choice). For each round, client and module
    an index set J (|J| = k_u, uniform without replacement, sorted) is drawn from a generator seeded by the round's
    seed (``RoundContext.seed``: run seed and round), the client and the module, identically on the server and the
    client, so no indices travel (our choice; the paper's server generates the sketches).

    Down: ``B[:, J]``, ``A[J, :]`` only, k_u(d+k) per matrix (``deliver``), plus the head. The client trains them as a
    rank-k_u LoRA at the scale ``s·r/k_u`` (``peer_scale``): for LoRA that is PEFT's own α/k_u; for rsLoRA it is set
    explicitly (α√r/k_u, not α/√k_u). Up: the trained factors and the head. Server: ``x ← x − Σ_u w_u P_u(x[J_u] −
    x_u)`` per factor, zeros outside J_u (no renormalisation), i.e. a server step of η = 1 (the code's default is
    a server AdamW at the client lr, with weight decay 0.01: not copied); the head is averaged. With every k_u = r
    it is FedIT.

    Not linear in the sense secure aggregation and client-level DP need: the rule is a weighted sum, but of
    uploads in each client's own coordinates J_u, which a secure sum of the uploads as sent cannot align; both are
    refused. Adapters: LoRA and rsLoRA (METHODS.md defines the sketch's scale for these; DoRA's normalisation is
    not linear in BA, VeRA has no rank components to sketch, HiRA has no scale to carry r/k_u)."""

    name = "fslora"
    title = "FSLoRA (Fang et al., arXiv 2501.19389)"
    rule = "fslora"
    summary = ("client u trains a seeded sketch J_u of k_u = r_u of the r components at scale s·r/k_u; "
               "B ← B − Σ w_u P_u(B[:, J_u] − B_u), A likewise (zeros outside J_u)")
    up = "r_u(d+k)"
    down = "r_u(d+k)"
    mixed_ranks = True
    client_ranks_are = "sketch sizes"
    # --async: inexact (METHODS.md). A client dispatched at version v trains the sketch of round v + 1's seed, cut from
    # x_v (async_delivers); its upload is rewritten in those coordinates (FedAsync (1−α_t)x[J] + α_t x_u; FedBuff
    # x[J] + h(τ)(x_u − x_v[J])) and the rule scatters it back through the same J (RoundContext.seeds)
    asynchronous = "inexact"
    async_delivers = True
    server_opt = SERVER_OPT_FACTORS  # on the pseudo-gradient Σ_u w_u P_u(x[J_u] − x_u): METHODS.md's x_{t+1} = ServerOpt(x_t, g)
    unsupported = {
        "dora": "FSLoRA's sketch is unbiased for BA, but DoRA's weight normalisation is not linear in BA; choose lora or rslora",
        "vera": "VeRA's rank components are shared random projections, not factors a client can sketch; choose lora or rslora",
        "hira": "HiRA's layer has no scale to carry the sketch's r/k_u; choose lora or rslora",
    }

    @classmethod
    def linear_text(cls) -> str:
        return "weighted sum in each client's coordinates (no secure sum)"

    def stepped_rank(self, h, ctx):
        return h.rank  # every component: the zeros outside a client's sketch are part of the unbiased estimator

    @classmethod
    def ranks(cls, rank, given, clients):
        sizes = list(given) if given else [math.ceil(rank / 2)] * clients
        if max(sizes) > rank:
            raise ValueError(f"fslora reads --client-ranks as sketch sizes of the global rank {rank}, but {max(sizes)} exceeds it; "
                             f"pass sizes from 1 to {rank}, or raise --rank")
        return rank, sizes

    def peer_scale(self, spec, rank):
        return spec.scale_at(spec.r) * spec.r / rank

    # ---- the sketch: the same on the server and the client ------------------------------------------------------
    def index_set(self, h, peer, module: str, seed: int) -> torch.Tensor:
        """Client ``peer``'s sketch J of ``module`` for the round whose seed is ``seed``."""
        return sketch_indices(h.rank, peer.rank, sketch_seed(seed, peer.cid, module))

    def sketch(self, h, tensors, peer, seed):
        """``tensors`` (global factors at rank r) with every module's factors cut to client ``peer``'s sketch."""
        if seed is None:
            raise ValueError("fslora draws each client's sketch from the seed of the round it trains; pass deliver(..., seed=)")
        out = dict(tensors)
        for module, k in h.keys.items():
            if k.B in tensors and k.A in tensors:
                J = self.index_set(h, peer, module, seed).to(tensors[k.A].device)
                out[k.B], out[k.A] = tensors[k.B].index_select(1, J), tensors[k.A].index_select(0, J)
        return out

    def start(self, h, initial, peer, seed):
        return self.sketch(h, initial, peer, seed)

    def deliver(self, h, broadcast, peer, seed=None):
        return self.sketch(h, broadcast, peer, seed)

    # ---- the server -----------------------------------------------------------------------------------------------
    def aggregate(self, h, uploads, weights, current, ctx):
        new, layers = dict(current), {}
        root = h.spec.scale_at(h.rank) ** 0.5 if ctx.mixed else 1.0  # metrics read the layers in the scaled space
        for module, k in h.keys.items():
            sets = [self.index_set(h, p, module, seed) for p, seed in zip(ctx.peers, ctx.peer_seeds())]
            agg = aggregate(self.rule, [u[k.B] for u in uploads], [u[k.A] for u in uploads], weights, name=module,
                            index_sets=sets, start=(current[k.B], current[k.A]))
            new[k.B], new[k.A] = agg.B, agg.A
            layers[module] = Aggregate(method=self.rule, B=agg.B * root, A=agg.A * root, info=agg.info)
        for n in h.other_names:  # the head (and any other shared trainable), averaged
            if all(n in u for u in uploads):
                new[n] = sum(float(w) * u[n].to(torch.float64) for w, u in zip(weights, uploads)).to(current[n].dtype)
        return ServerUpdate(broadcast=new, layers=layers, scales=ctx.scales)
