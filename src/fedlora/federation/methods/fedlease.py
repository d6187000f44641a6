"""FedLEASE (Wang, Bian, Zhang, Xu, NeurIPS 2025): clients clustered once by their round-0 LoRA, one LoRA expert per
cluster, a private router per client. Math: :mod:`fedlora.aggregation.fedlease`; the structure:
:func:`fedlora.adapters.structures.install_experts`."""

import torch

from fedlora.adapters.structures import install_experts, slot_map
from fedlora.aggregation import aggregate
from fedlora.aggregation.fedlease import MAX_EXPERTS, cluster_clients, expert_init, lease_distances
from fedlora.federation.protocol import SERVER_OPT_FACTORS, Method, Option, ServerUpdate, register

CLUSTERS = "fedlease.clusters"  # round 0's broadcast: (2, n) client ids over their clusters (never sent as it is)
CLUSTER = "fedlease.cluster"  # what client u receives of it: (c_u, M), two numbers

_STRUCTURE = ("the experts are LoRA paths B_e·A_e·x mixed by a router; {} has other factors, so its forward would not be "
              "a sum of LoRA paths; choose lora or rslora")


@register
class FedLEASE(Method):
    """Round 0 (every client, bytes in round 1's row): a fresh LoRA trained for the round's local steps, ``(B_u, A_u)``
    sent. The server clusters the clients by ``d(u,v)`` = mean over layers of ``1 − cos(vec B_u, vec B_v)``
    (average linkage, K* by silhouette over K = 2..min(K_max, N−1); N ≤ 2 → one cluster), sets expert j of every
    layer to the w-weighted mean of its members' B and A, and sends every client the M = K* experts and its cluster.
    Each client's model is ``y = W0x + s Σ_e ω_e B_eA_e x`` with its own router (2M−1 slots, M of them its cluster's
    expert; see :mod:`fedlora.aggregation.fedlease`). Rounds 1..T: a client trains its cluster's expert and its
    router (every other expert frozen: ``requires_grad``), sends the expert, ``r(d+k)``; expert j ← FedIT over the
    round's sampled members of cluster j, renormalised; the others unchanged; every client receives all M experts,
    ``M·r(d+k)``. The head is trained, sent and averaged over every sampled client, as FedIT (``--keep-head-local``
    keeps it private).

    Choices where METHODS.md and the summaries leave them open:

    - Round 0 trains the fresh LoRA (expert 0 of the structure, as PEFT initialised it) and the head, with the
      round's local steps and learning rate, seeded by the run seed alone; only (B_u, A_u) go up and the client then
      returns to the initial state (its round-0 head is dropped).
    - The model is built with K_max = ``--fedlease-max-experts`` (default 8, METHODS.md's bound) expert slots per
      layer so every process builds the same parameters before the clustering; only the M the clustering found are
      used, trained and sent (the router's unused slots are masked out). A client's cluster is its slot map, a
      per-layer vector held like a private trainable and never trained; it arrives with round 0's broadcast.
    - A client left out of round 0 (it failed) joins the largest cluster (ties: the lower index).
    - The router is private and zero-initialised (at start only expert c is chosen, weight M/(2M−1)); it sees the
      layer's input after the adapter's dropout, as the experts do. ``--fedlease-router cluster`` is not offered.
    - Global score: the mean over all clients of their own model (experts, router) on the global test set; the
      server's own model (the largest cluster's routing, zero router) is not scored and not exported. To score it
      the server needs each router: a client sends its private state (router, slot map, a private head) with its
      upload as ``eval_extras``, evaluation-only traffic not counted in the bytes (FedSA's B reaches the server the
      same way), never aggregated nor broadcast; the server keeps each client's last accepted one (checkpointed
      with the server state). So the score is the same in-process and on Flower, where the router otherwise stays
      in the SuperNode's state; a router that must never leave the client cannot be scored this way.
    - Not linear in the sense secure aggregation needs (the server sums per cluster, so it must see who is in which),
      not exact. LoRA and rsLoRA; one rank for all clients.
    """

    name = "fedlease"
    async_refusal = "its clustering and stages are barriers for all clients"
    title = "FedLEASE (Wang et al., NeurIPS 2025)"
    rule = "fedlease"
    summary = "round 0: cluster clients by their LoRA's B; one expert per cluster, FedIT within it; private top-M router"
    up = "r(d+k)"
    down = "M·r(d+k)"
    exactness = "personalised"
    personalised = True
    server_opt = SERVER_OPT_FACTORS
    no_global_model = ("fedlease has no one global model to load: each client mixes the shared experts with its own router; "
                       "resume the run's checkpoint (each client's experts, cluster and router are there) and score a client's own state")
    unsupported = {kind: _STRUCTURE.format(name) for kind, name in (("dora", "DoRA"), ("vera", "VeRA"), ("hira", "HiRA"))}
    options = {"max_experts": Option(MAX_EXPERTS, "FedLEASE: the largest number of clusters (experts) tried, K ≤ min(this, N−1)")}

    def __init__(self, **options):
        super().__init__(**options)
        if self.settings["max_experts"] < 1:
            raise ValueError(f"fedlease-max-experts={self.settings['max_experts']} is below 1; pass e.g. 8")
        self.experts = 1  # M, known once round 0 is applied (or read back from the global state)
        self._untrained: set[str] = set()
        self.scoring: dict[int, dict] = {}  # cid -> its private state as last accepted (router, slots, own head): scores only

    def prepare(self, model, spec, seed):
        install_experts(model, self.settings["max_experts"])

    # -- names ---------------------------------------------------------------------------------------------------
    def expert_names(self, h, e: int) -> dict[str, tuple[str, str]]:
        """Per module, the (B, A) parameter names of expert e."""
        out = {}
        for module, k in h.keys.items():
            if e == 0:
                out[module] = (k.B, k.A)
            else:
                out[module] = (f"{k.B.removesuffix('.weight')}.more.{e - 1}", f"{k.A.removesuffix('.weight')}.more.{e - 1}")
        return out

    def factor_names(self, h):
        return {n for e in range(1, self.settings["max_experts"]) for pair in self.expert_names(h, e).values() for n in pair}

    def slot_names(self, h) -> list[str]:
        return [f"{k.A.removesuffix('.weight')}.slots" for k in h.keys.values()]

    def router_names(self, h) -> list[str]:
        return [f"{k.A.removesuffix('.weight')}.router.{p}" for k in h.keys.values() for p in ("weight", "bias")]

    def cluster_of(self, slots: torch.Tensor) -> tuple[int, int]:
        """(c, M) from a slot map."""
        used = int((slots.detach().round() >= 0).sum())
        return int(slots[0].round()), (used + 1) // 2

    def _slots(self, h, cluster: int, experts: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(like, -1.0)
        out[: 2 * experts - 1] = torch.tensor(slot_map(cluster, experts), dtype=like.dtype)
        return out

    # -- round 0 ---------------------------------------------------------------------------------------------------
    def needs_setup(self):
        return True

    def setup_upload(self, h, task, train, cfg):
        """Train the fresh LoRA (expert 0) and the head for the round's local steps; send (B_u, A_u)."""
        from fedlora.federation.simulator import round_seed, train_local

        fresh = [n for pair in self.expert_names(h, 0).values() for n in pair]
        h.set_trainable(h.trainable_names, False)
        h.set_trainable(fresh + list(h.head_names), True)
        train_local(h.model, task, train, cfg, round_seed(cfg.seed, 0))
        return h.get(fresh)

    def setup_aggregate(self, h, uploads, weights, current, peers=None):
        """Cluster, initialise the experts, and put each client's cluster into the broadcast (``peers``: the
        uploaders, in order; ids 0..n−1 by position where not given)."""
        modules = list(h.keys)
        names = self.expert_names(h, 0)
        D = lease_distances([[u[names[m][0]] for m in modules] for u in uploads])
        labels, _ = cluster_clients(D, self.settings["max_experts"])
        out = {}
        for m in modules:
            experts = expert_init([u[names[m][0]] for u in uploads], [u[names[m][1]] for u in uploads], weights, labels)
            for e, (B, A) in enumerate(experts):
                nB, nA = self.expert_names(h, e)[m]
                out[nB], out[nA] = B.to(current[nB].dtype), A.to(current[nA].dtype)
        cids = [p.cid for p in peers] if peers is not None else list(range(len(uploads)))
        out[CLUSTERS] = torch.tensor([cids, labels], dtype=torch.long)
        return out

    # -- client side ------------------------------------------------------------------------------------------------
    def frozen(self, h, rnd, peer=None):
        """Every expert but the client's (read from the slot map loaded into the model), and the slot maps."""
        if peer is None:  # no client meant: what every client freezes
            return self.slot_names(h)
        mine = self.cluster_of(h.parameter(self.slot_names(h)[0]))[0]
        names = [n for e in range(self.settings["max_experts"]) if e != mine for pair in self.expert_names(h, e).values() for n in pair]
        return names + self.slot_names(h)

    def private(self, h):
        return self.router_names(h) + self.slot_names(h) + super().private(h)

    def upload(self, h, tensors, rnd, start=None, peer=None):
        """The client's cluster's expert (its cluster read from its slot map in ``tensors``) and the head."""
        c, _ = self.cluster_of(tensors[self.slot_names(h)[0]])
        mine = {n for pair in self.expert_names(h, c).values() for n in pair}
        experts = {n for e in range(self.settings["max_experts"]) for pair in self.expert_names(h, e).values() for n in pair}
        private = set(self.private(h)) | (experts - mine)
        return {n: t for n, t in tensors.items() if n not in private}

    def eval_extras(self, h, tensors):
        """The client's private state (router, slot map, a private head), sent only to score its own model."""
        return {n: tensors[n] for n in self.private(h)}

    def scored_states(self, held, private):
        """Each client's own model: what it holds of the experts and its private state as the server last received it
        (``eval_extras``, the same tensors in-process and on Flower); a client never accepted: its zero router."""
        return [held[c] | self.scoring.get(c, {}) for c in sorted(held)]

    def server_state(self):
        return {f"scoring/{c}/{n}": t for c, state in self.scoring.items() for n, t in state.items()}

    def load_server_state(self, tensors):
        self.scoring = {}
        for key, t in tensors.items():
            owner, _, name = key.removeprefix("scoring/").partition("/")
            self.scoring.setdefault(int(owner), {})[name] = t

    # -- server side ------------------------------------------------------------------------------------------------
    def comm_options(self, rnd):
        return {"experts": self.experts}

    def trained_experts(self, h, uploads) -> list[int]:
        """Per upload, the expert it carries."""
        keys = {pair[0]: e for e in range(self.settings["max_experts"]) for pair in self.expert_names(h, e).values()}
        return [next(keys[n] for n in u if n in keys) for u in uploads]

    def aggregate(self, h, uploads, weights, current, ctx):
        _, self.experts = self.cluster_of(current[self.slot_names(h)[0]])
        mine = set(self.private(h))
        for peer, u in zip(ctx.peers, uploads):  # the eval extras: kept to score each client's own model
            self.scoring[peer.cid] = {n: t.detach().clone() for n, t in u.items() if n in mine}
        uploads = [{n: t for n, t in u.items() if n not in mine} for u in uploads]
        owner = self.trained_experts(h, uploads)
        new = dict(current)
        for n in h.other_names:  # the head, averaged over every sampled client that sent it (FedIT)
            if n in h.head_names and all(n in u for u in uploads):
                new[n] = sum(float(w) * u[n] for w, u in zip(weights, uploads)).to(current[n].dtype)
        for e in sorted(set(owner)):
            members = [i for i, o in enumerate(owner) if o == e]
            w = weights[members].double() / weights[members].double().sum()
            for module, (nB, nA) in self.expert_names(h, e).items():
                agg = aggregate(self.rule, [uploads[i][nB] for i in members], [uploads[i][nA] for i in members], w,
                                name=module, experts=self.experts)
                new[nB], new[nA] = agg.B.to(current[nB].dtype), agg.A.to(current[nA].dtype)
        sent = {n for e in range(self.experts) for pair in self.expert_names(h, e).values() for n in pair}
        sent |= {n for n in h.head_names if n in new and n not in self.private(h)}
        self._untrained = {n for e in range(self.experts) if e not in owner for pair in self.expert_names(h, e).values() for n in pair}
        return ServerUpdate(broadcast={n: new[n] for n in sent}, notes={"experts": self.experts})

    def untrained(self, h, ctx):
        """The experts of clusters no client sampled this round belongs to: a server optimiser leaves them alone."""
        return self._untrained

    def deliver(self, h, broadcast, peer, seed=None):
        if CLUSTERS not in broadcast:
            return broadcast
        table = broadcast[CLUSTERS]
        labels = dict(zip(table[0].tolist(), table[1].tolist()))
        M = int(table[1].max()) + 1
        if peer.cid in labels:
            c = labels[peer.cid]
        else:  # left out of round 0: the largest cluster, ties to the lower index
            sizes = torch.bincount(table[1], minlength=M)
            c = int(torch.argmax(sizes))
        return {n: t for n, t in broadcast.items() if n != CLUSTERS} | {CLUSTER: torch.tensor([c, M], dtype=torch.long)}

    def take(self, h, delivered, current, peer, seed):
        out = super().take(h, delivered, current, peer, seed)
        if CLUSTERS in delivered:  # the server's own model (in no cluster): the largest cluster's routing
            delivered = self.deliver(h, delivered, peer)
        if CLUSTER in delivered:
            c, M = (int(x) for x in delivered[CLUSTER])
            self.experts = M
            for n in self.slot_names(h):
                out[n] = self._slots(h, c, M, current[n])
        return out
