"""Fed-HeLLo (Zhang et al., TNNLS 2025): each client trains the LoRA of the blocks it can afford, allocated per round.
Math: :mod:`fedlora.aggregation.fedhello`."""

import torch

from fedlora.aggregation import Aggregate, aggregate, comm_elements
from fedlora.aggregation.fedhello import PATTERNS, allocate, block_of, layer_probabilities
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, ServerUpdate, register


@register
class FedHeLLo(Method):
    """Client u trains the LoRA of L_u transformer blocks (``--fedhello-layers 6,9,12``: budgets given to clients in
    turn, like ``--client-ranks``; empty: every block); the other blocks' LoRA is frozen for it (``frozen`` sees the
    client). Each round and client the blocks are drawn without replacement with probabilities p_l
    (``--fedhello-pattern``: bottleneck, the official layer_prob resampled to the model's blocks; uniform; triangle;
    inverted), seeded by (run seed, round, client). A block is the exact integer component of the module name.

    Up: the allocated blocks' factors and the head. Down: the whole adapter and the head. Server: each module
    averaged over the clients that trained its block, weights renormalised over them; a block nobody trained keeps
    its factors; the head over all participants (the official code never uploads the head, so its global head stays
    random: not copied; it also weights by batches, here by examples).

    Our choices: adapted modules outside any numbered block (none in BERT, GPT-2 or Llama targets) train on every
    client, as the head does; FIM-HLA (the Fisher-information allocation the code switches to after 50 rounds) is
    not implemented; the rule in fedit's place is fixed. Not linear in the sense secure aggregation and client-level
    DP need (clients send different blocks, renormalised per block): both are refused. Adapters: LoRA, rsLoRA, VeRA
    and HiRA; DoRA is refused (its magnitude vectors are adapter state averaged over every client, so a client
    would move the vectors of blocks it does not train). One rank for all clients."""

    name = "fedhello"
    title = "Fed-HeLLo (Zhang et al., TNNLS 2025)"
    rule = "fedhello"
    summary = "client u trains L_u blocks drawn with probabilities p_l; each block averaged over the clients that trained it"
    up = "r(d+k) (allocated blocks only)"
    down = "r(d+k)"
    server_opt = SERVER_OPT_FACTORS
    needs_blocks = True
    unsupported = {"dora": "DoRA's magnitude vectors are averaged over every client, so a client would change blocks it does not train; "
                           "choose lora, rslora, vera or hira"}
    options = {
        "layers": Option("", "Fed-HeLLo: blocks each client trains, given to clients in turn (e.g. 6,9,12); empty: every block"),
        "pattern": Option("bottleneck", "Fed-HeLLo: allocation probabilities over blocks", PATTERNS),
    }

    @classmethod
    def linear_text(cls) -> str:
        return "per block (no secure sum)"

    def __init__(self, **options):
        super().__init__(**options)
        text = str(self.settings["layers"])
        try:
            self.budgets = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            self.budgets = [0]
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"fedhello-layers={text!r} is not a list of block counts ≥ 1; pass e.g. --fedhello-layers 1,2")
        self.run_seed: int | None = None
        self.blocks: dict[str, int | None] = {}  # adapted module → its block

    def prepare(self, model, spec, seed):
        self.run_seed = seed
        attr = spec.variant.b_attr  # the adapted layers, named as AdapterHandle names them
        names = [n.removeprefix("base_model.model.") for n, m in model.named_modules()
                 if hasattr(m, attr) and hasattr(m, "get_base_layer") and "default" in getattr(m, attr)]
        self.blocks = {n: block_of(n) for n in names}
        if not any(b is not None for b in self.blocks.values()):
            raise ValueError("fedhello allocates transformer blocks, but no adapted layer is inside a numbered block; "
                             "adapt layers of the model's blocks (e.g. --target-modules query,value)")

    # ---- the allocation ---------------------------------------------------------------------------------------
    def allocated(self, rnd: int, cid: int) -> set[int]:
        """The blocks client ``cid`` trains in round ``rnd``."""
        if self.run_seed is None:
            raise ValueError("fedhello's allocation needs the run's seed; build the run (Method.prepare) before training")
        blocks = sorted({b for b in self.blocks.values() if b is not None})
        budget = self.budgets[cid % len(self.budgets)] if self.budgets else len(blocks)
        probs = layer_probabilities(len(blocks), self.settings["pattern"])
        return set(allocate(blocks, budget, probs, self.run_seed, rnd, cid))

    def trains(self, module: str, rnd: int, cid: int) -> bool:
        block = self.blocks.get(module, block_of(module))
        return block is None or block in self.allocated(rnd, cid)

    def frozen(self, h, rnd, peer=None):
        if peer is None or peer.cid < 0:
            return []
        return [n for module, k in h.keys.items() if not self.trains(module, rnd, peer.cid) for n in (k.B, k.A)]

    def untrained(self, h, ctx):
        """The factors of the blocks no client of the round was allocated (a server optimiser leaves them alone)."""
        return {n for module, k in h.keys.items() if not any(self.trains(module, ctx.number, p.cid) for p in ctx.peers)
                for n in (k.B, k.A)}

    def declared_elements(self, d, k, r, U, rnd, *, module=None, peer=None):
        """Per matrix: both factors up in a block the client trains this round (``module``, ``peer`` given), none
        in the others; the whole adapter down."""
        trained = module is None or peer is None or self.trains(module, rnd, peer.cid)
        return comm_elements(self.rule, d, k, r, U, trained=trained)

    # ---- the server -------------------------------------------------------------------------------------------
    def aggregate(self, h, uploads, weights, current, ctx):
        views = [h.factors(u) for u in uploads]
        B0, A0 = h.factors(current)
        new, layers = dict(current), {}
        for module, k in h.keys.items():
            trainers = [i for i, v in enumerate(views) if module in v[0] and module in v[1]]
            if not trainers:  # nobody trained this block: unchanged (and measured as such)
                layers[module] = Aggregate(method=self.rule, B=B0[module], A=A0[module])
                continue
            w = weights[trainers] / weights[trainers].sum()
            agg = aggregate(self.rule, [views[i][0][module] for i in trainers], [views[i][1][module] for i in trainers], w, name=module)
            sub = [uploads[i] for i in trainers]
            for name, t, coef in ((k.B, agg.B, agg.p), (k.A, agg.A, agg.q)):
                if (written := h.kind.write(h, name, t, sub, coef)) is not None:
                    new[name] = written
            layers[module] = agg
        for n in h.other_names:  # the head over every participant that sent it
            if all(n in u for u in uploads):
                new[n] = sum(float(w) * u[n].to(torch.float64) for w, u in zip(weights, uploads)).to(current[n].dtype)
        return ServerUpdate(broadcast=new, layers=layers)
