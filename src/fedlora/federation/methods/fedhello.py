"""Fed-HeLLo (Zhang et al., TNNLS 2025): each client trains the LoRA of the blocks it can afford, allocated per round.
Math: :mod:`fedlora.aggregation.fedhello`."""

import torch

from fedlora.aggregation import Aggregate, aggregate, comm_elements
from fedlora.aggregation.fedhello import PATTERNS, _seed, allocate, block_of, block_scores, fim_probabilities, layer_probabilities
from fedlora.federation.protocol import SERVER_OPT_FACTORS, STATE, Method, Option, ServerUpdate, is_state, register

# FIM-HLA's method state (protocol.STATE): a client's per-block scores up, the allocation probabilities down.
SCORES, FIM = STATE + "fedhello.scores", STATE + "fedhello.fim"
FIM_EXAMPLES = 32  # examples per client the scores are computed on (the official code's FIM sample size is per class)


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

    ``--fedhello-pattern fim`` (FIM-HLA): in every round t with ``t % --fedhello-fim-every == 0`` (default 50, the
    official switch and period) each sampled client, before training, scores every block on its start model:
    ``F_l = Σ_{block l's factor tensors} ‖(1/n) Σ_i g_i²‖_F`` over n = 32 of its own training examples (fewer if it
    has fewer; drawn without replacement, seeded by run seed, round and client; one example per backward pass, model
    in eval mode, every block's factors differentiated whatever its allocation), and sends the L floats
    (``Method.probe``). The server averages them with the round's weights w, runs a 1-D k-means with 3 clusters
    (seeded by run seed and round: 10 restarts from distinct scores drawn as initial centres, the least inertia
    kept, as sklearn's n_init; levels renumbered by ascending centre, never the code's unsorted unseeded labels)
    and gives the levels weights 1, 2, 3, normalised over the blocks (the code's 1/27, 2/27, 1/9 are 1:2:3 over
    27, and a weighted draw normalises them anyway; fewer distinct scores than 3: their ranks are the levels). The
    probabilities (L floats, float32) go down with round t's broadcast and allocate from round t+1 on, until the
    next FIM round; before the first one the pattern is the default, bottleneck (METHODS.md: the code "switches to
    it after 50 rounds"). A client reads them from its start state (``frozen(…, start)``), the server from its own
    checkpointed history. Never the code's FIM on pooled server data: each client scores its own examples.

    Our choices: adapted modules outside any numbered block (none in BERT, GPT-2 or Llama targets) train on every
    client, as the head does (and are not scored); the rule in fedit's place is fixed. Not linear in the sense secure aggregation and client-level
    DP need (clients send different blocks, renormalised per block): both are refused. Adapters: LoRA, rsLoRA, VeRA
    and HiRA; DoRA is refused (its magnitude vectors are adapter state averaged over every client, so a client
    would move the vectors of blocks it does not train). One rank for all clients."""

    name = "fedhello"
    title = "Fed-HeLLo (Zhang et al., TNNLS 2025)"
    rule = "fedhello"
    summary = "client u trains L_u blocks drawn with probabilities p_l; each block averaged over the clients that trained it"
    up = "r(d+k) (allocated blocks only; + L scores in a FIM round)"
    down = "r(d+k) (+ L probabilities in a FIM round)"
    server_opt = SERVER_OPT_FACTORS
    needs_blocks = True
    # --async: each block's uploads mixed as fedit's (A and B apart); a stale client trains, and its upload is
    # screened, with the allocation of its own round (v_u + 1). The fim pattern stays synchronous (__init__).
    asynchronous = "inexact"
    unsupported = {"dora": "DoRA's magnitude vectors are averaged over every client, so a client would change blocks it does not train; "
                           "choose lora, rslora, vera or hira"}
    options = {
        "layers": Option("", "Fed-HeLLo: blocks each client trains, given to clients in turn (e.g. 6,9,12); empty: every block"),
        "pattern": Option("bottleneck", "Fed-HeLLo: allocation probabilities over blocks (fim: from the clients' Fisher "
                                        "scores, every fedhello-fim-every rounds; bottleneck before the first)", PATTERNS),
        "fim_every": Option(50, "Fed-HeLLo: with pattern fim, the rounds between Fisher scorings (round t scores when "
                                "t is a multiple; its allocation is used from round t+1)", interval="[1, inf)"),
    }

    @classmethod
    def linear_text(cls) -> str:
        return "per block (no secure sum)"

    @classmethod
    def async_text(cls) -> str:
        return "inexact (not pattern fim)"

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
        self.fim: dict[int, torch.Tensor] = {}  # the server's FIM allocations: first round used → probabilities
        if self.settings["pattern"] == "fim":
            self.asynchronous = ""
            self.async_refusal = ("its Fisher-scoring rounds are a barrier for all clients; pass another --fedhello-pattern "
                                  "(bottleneck, uniform, triangle, inverted) to run it asynchronously")

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
    @property
    def block_list(self) -> list[int]:
        return sorted({b for b in self.blocks.values() if b is not None})

    def fim_round(self, rnd: int) -> bool:
        """Whether round ``rnd``'s clients send Fisher scores (pattern fim, rnd a multiple of fedhello-fim-every)."""
        return self.settings["pattern"] == "fim" and rnd % int(self.settings["fim_every"]) == 0

    def probabilities(self, rnd: int, start=None) -> torch.Tensor:
        """``p_l`` of round ``rnd``: the pattern's; for fim the last allocation received (a client: ``start``) or made
        (the server) before the round, bottleneck before the first."""
        if self.settings["pattern"] != "fim":
            return layer_probabilities(len(self.block_list), self.settings["pattern"])
        if start is not None:
            p = start.get(FIM)
        else:
            since = [r for r in self.fim if r <= rnd]
            p = self.fim[max(since)] if since else None
        return layer_probabilities(len(self.block_list), "bottleneck") if p is None else p.to(torch.float64)

    def allocated(self, rnd: int, cid: int, start=None) -> set[int]:
        """The blocks client ``cid`` trains in round ``rnd`` (``start``: what it starts from, on the client)."""
        if self.run_seed is None:
            raise ValueError("fedhello's allocation needs the run's seed; build the run (Method.prepare) before training")
        blocks = self.block_list
        budget = self.budgets[cid % len(self.budgets)] if self.budgets else len(blocks)
        return set(allocate(blocks, budget, self.probabilities(rnd, start), self.run_seed, rnd, cid))

    def trains(self, module: str, rnd: int, cid: int, start=None) -> bool:
        block = self.blocks.get(module, block_of(module))
        return block is None or block in self.allocated(rnd, cid, start)

    def frozen(self, h, rnd, peer=None, start=None):
        if peer is None or peer.cid < 0:
            return []
        return [n for module, k in h.keys.items() if not self.trains(module, rnd, peer.cid, start) for n in (k.B, k.A)]

    def upload(self, h, tensors, rnd, start=None, peer=None):
        """The allocated blocks' factors and the head; in a FIM round the layout also lists the scores (``probe``)."""
        view = start if start is not None else tensors
        held = set(self.private(h)) | set(self.frozen(h, rnd, peer=peer, start=view))
        out = {n: t for n, t in tensors.items() if n not in held and not is_state(n)}
        if start is None and peer is not None and peer.cid >= 0 and self.fim_round(rnd):
            out[SCORES] = torch.zeros(len(self.block_list), dtype=torch.float32)
        return out

    def take(self, h, delivered, current, peer, seed):
        """A client keeps the FIM allocation it received in its view (method state); the server's model does not."""
        out = super().take(h, delivered, current, peer, seed)
        return out | {FIM: delivered[FIM]} if FIM in delivered and peer.cid >= 0 else out

    # ---- FIM-HLA ----------------------------------------------------------------------------------------------
    def probe(self, h, peer, rnd, task, train, cfg):
        """In a FIM round: the client's per-block scores F_l on 32 of its examples (seeded), float32."""
        if not self.fim_round(rnd):
            return {}
        names = {n: self.blocks[m] for m, k in h.keys.items() if self.blocks.get(m) is not None for n in (k.B, k.A)}
        if len(train) == 0:
            raise ValueError(f"fedhello: client {peer.cid} has no training examples to compute its Fisher scores on")
        gen = torch.Generator().manual_seed(_seed("fedhello-fim", self.run_seed, rnd, peer.cid))
        index = torch.randperm(len(train), generator=gen)[:FIM_EXAMPLES]
        grads = example_gradients(h, task, train, index, cfg.device, list(names))
        return {SCORES: block_scores(grads, names, self.block_list).to(torch.float32)}

    def side_bytes(self, h, rnd, peer=None):
        """In a FIM round: the L scores up and the L probabilities down (float32)."""
        return (4 * len(self.block_list),) * 2 if self.fim_round(rnd) else (0, 0)

    def server_state(self):
        return {f"fim/{r}": p for r, p in self.fim.items()}

    def load_server_state(self, tensors):
        self.fim = {int(k.removeprefix("fim/")): p for k, p in tensors.items() if k.startswith("fim/")}

    def _allocate_by_fim(self, uploads, weights, rnd: int, new) -> None:
        """The w-weighted mean of the scores sent, k-means levels → probabilities, used from round rnd + 1."""
        sent = [(float(w), u[SCORES]) for w, u in zip(weights, uploads) if SCORES in u]
        if not sent:
            return
        F = sum(w * s.to(torch.float64) for w, s in sent) / sum(w for w, _ in sent)
        probs = fim_probabilities(F, _seed("fedhello-kmeans", self.run_seed, rnd)).to(torch.float32)
        self.fim[rnd + 1] = probs.to(torch.float64)  # what clients receive (float32), so both draw the same blocks
        new[FIM] = probs

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
        if self.fim_round(ctx.number):
            self._allocate_by_fim(uploads, weights, ctx.number, new)
        return ServerUpdate(broadcast=new, layers=layers)


def example_gradients(h, task, train, index, device, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per-example gradients of the tensors ``names`` (one backward pass per example of ``train`` at ``index``), with
    the model in eval mode and every named tensor differentiated; the model's trainable flags and mode are restored."""
    model, params = h.model, [h.parameter(n) for n in names]
    was_training, flags = model.training, [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        out = []
        for i in index.tolist():
            loss = task.loss(model, train.batch(torch.tensor([i]), device))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out.append({n: torch.zeros_like(p) if g is None else g.detach() for n, p, g in zip(names, params, grads)})
        return out
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
