"""HiLoRA (Peng et al., CVPR 2026): root, cluster and leaf LoRA tiers. Math: :mod:`fedlora.aggregation.hilora`;
the leaf tier's structure: :func:`fedlora.adapters.structures.add_summed_adapter`."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fedlora.adapters.structures import LEAF, add_summed_adapter
from fedlora.aggregation.hilora import orthogonality, spectral_clusters, track
from fedlora.federation.protocol import FOLD, FOLD_L, FOLD_R, Method, Option, ServerUpdate, register

CLUSTER = "hilora.cluster"  # the delivered marker of a client's cluster at the switch (one int32)
PREFIX = "hilora/c"  # broadcast keys of the cluster stage: f"{PREFIX}{c}/{name}"
ROOT, CLUSTERS, LEAVES = "root", "cluster", "leaf"


def parse_stages(text: str, rounds: int) -> tuple[int, int]:
    """``(T_r, T_c)`` from ``--hilora-stages``: ``auto`` (⌈0.3T⌉, ⌈0.4T⌉) or ``T_r,T_c``."""
    if str(text).strip() == "auto":
        return math.ceil(0.3 * rounds), math.ceil(0.4 * rounds)
    try:
        root, cluster = (int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"hilora-stages={text!r} is not 'auto' or two round counts; pass e.g. hilora-stages=3,4") from None
    if root < 1 or cluster < 0:
        raise ValueError(f"hilora-stages={text!r} needs a root stage of 1 round or more and a cluster stage of 0 or more; pass e.g. 3,4")
    return root, cluster


@register
class HiLoRA(Method):
    """Three LoRA tiers per adapted matrix, rank r each: ``ΔW_u = s(B_rA_r + B_cA_c + B_lA_l)``.

    - Root stage (rounds 1..T_r): clients train the default adapter (A and B); the server takes the best rank-r
      approximation of ``M = Σ w_u s B_uA_u`` (factor-space SVD) as ``B_r = U_r``, ``A_r = Σ_rV_rᵀ/s`` and tracks
      each sampled client's direction ``B̄_u`` per module (λ = 0.9).
    - The switch (the server, after round T_r): spectral clustering of the clients on the subspaces of their B̄
      (eigengap K*, NJW, seeded by the run). Every client folds the root tier into its base (the round's broadcast
      is ``fold_L = B_r``, ``fold_R = A_r``: r(d+k), what a root round sends; a client that missed it is sent it when
      next sampled) and starts a fresh LoRA seeded by its cluster id, told by one int32 (``hilora.cluster``).
    - Cluster stage (to T_r+T_c): clients train the default adapter with ``+ γ_c‖B_rᵀB‖_F²`` per module; the
      server runs the root rule per cluster over its sampled members (weights renormalised); clients receive their
      cluster's LoRA; a cluster with no sampled member keeps its LoRA.
    - Leaf stage (after): the default adapter (the cluster tier) is frozen; each client trains a private leaf LoRA
      (a second adapter summed with the default one, PEFT's init, kept across rounds) with
      ``γ_c‖B_rᵀB_l‖² + γ_l‖B_cᵀB_l‖²``; nothing travels.

    Our choices: ``--hilora-stages auto`` is T_r = ⌈0.3T⌉, T_c = ⌈0.4T⌉ of the run's rounds T (a resumed run with
    more rounds moves them: pass the stages explicitly to keep them). The head (a classifier) travels with the
    tier that travels: averaged over all sampled clients in the root stage, per cluster in the cluster stage,
    frozen in the leaf stage (``--keep-head-local``: private throughout). The global model is the root tier alone
    (its head: the root stage's); a client's own model has all tiers. A client never sampled in the root stage
    trains one probe round in the switch round (:meth:`participants` adds it to the round): it starts from the
    root tier it holds, trains A and B as a root round, and its upload gives it a B̄ but is left out of the root
    rule (the sampled clients' weights are renormalised); its bytes are that round's, up and down, and it is
    listed in ``clients`` and ``hilora_probes``. The switch round's metrics line reports the clustering: D as
    ``hilora_distances`` (N×N, rounded to 1e-6), ``hilora_k`` = K*, ``hilora_eigengap`` = λ_{K*+1} − λ_{K*}
    (None where K* = 1 without an eigengap) and ``hilora_clusters``. Measured (METHODS.md asks; tiny:bert, 5
    clients, r = 4, d = 32, 2 local steps, Dirichlet split, fraction 1, root stage 1 or 3 rounds): D is
    near-uniform but not small: off-diagonal 0.70–0.81 after one root round, 0.69–0.79 after three (random
    4-dimensional subspaces of R^32 average 1 − r/d = 0.875), eigengap ≈ 0.02, so K* is a weak choice on such runs.
    With λ = 0.9 B̄_u is dominated by the client's first root upload (trained from B = 0), not by the shared B_r
    of the later rounds, and the later uploads' (B_r + ΔB_u) add mostly B_r's direction to every client alike.
    The orthogonality penalties use the B's as trained (not scaled by s). B_r is
    orthonormal on M's numerical rank (zero columns beyond it). LoRA and rsLoRA; one rank for all clients.
    """

    name = "hilora"
    async_refusal = "its stages are barriers for all clients"
    title = "HiLoRA (Peng et al., CVPR 2026)"
    rule = "hilora"
    summary = "root tier = [ΣwsBA]_r (B orthonormal); spectral clusters of the tracked B; per-cluster tier; private leaf tier"
    up = "r(d+k) (root and cluster stages), 0 (leaf stage)"
    down = "r(d+k) (root and cluster stages), 0 (leaf stage)"
    exactness = "personalised"
    personalised = True
    server_opt_refusal = ("its root and cluster tiers are a new orthonormal basis each round (a truncated SVD) and its "
                          "leaf tier never reaches the server, so per-factor optimiser state would have no fixed coordinates")
    options = {
        "stages": Option("auto", "HiLoRA stage lengths: 'auto' (root ⌈0.3T⌉ rounds, cluster ⌈0.4T⌉, leaf the rest) or 'T_r,T_c'"),
        "gamma_c": Option(0.1, "HiLoRA weight γ_c of the orthogonality to the root tier ‖B_rᵀB‖²"),
        "gamma_l": Option(0.1, "HiLoRA weight γ_l of the leaf tier's orthogonality to the cluster tier ‖B_cᵀB_l‖²"),
        "lam": Option(0.9, "HiLoRA decay λ of the server's tracked B̄ per client"),
    }
    unsupported = {
        "dora": "the tiers add LoRA paths B·A·x; DoRA's normalised update is not of that form; choose lora or rslora",
        "vera": "not offered: the root rule's orthonormal B_r is not of VeRA's diag(λ_b)·B form; choose lora or rslora",
        "hira": "not offered: HiRA's update W0 ⊙ B·A is not a LoRA path to sum as a tier; choose lora or rslora",
    }

    def __init__(self, **options):
        super().__init__(**options)
        parse_stages(self.settings["stages"], 10)  # checked now, resolved by schedule()
        if not 0.0 <= self.settings["lam"] < 1.0:
            raise ValueError(f"hilora-lam={self.settings['lam']} is outside [0, 1); pass e.g. 0.9")
        for g in ("gamma_c", "gamma_l"):
            if not self.settings[g] >= 0:
                raise ValueError(f"hilora-{g.replace('_', '-')}={self.settings[g]} is negative; pass e.g. 0.1")
        self.rule_options = {}
        self.stages, self.seed, self.n_clients = (math.inf, 0), 0, 0
        self.tracked: dict[int, dict] = {}  # cid -> module -> B̄_u
        self.labels: dict[int, int] = {}  # cid -> cluster, from the switch on
        self.clusters: dict[int, dict] = {}  # cluster -> its LoRA (and head)
        self.root_B: dict[str, torch.Tensor] = {}  # module -> B_r, from the fold
        self._views: tuple = (None, {})
        self.probes: set[int] = set()  # this switch round's probe clients (participants), not in the root rule

    # ---- schedule ----------------------------------------------------------------------------------------------
    def schedule(self, rounds, clients=0):
        self.stages, self.n_clients = parse_stages(self.settings["stages"], rounds), clients

    def participants(self, rnd, sampled, clients):
        """The switch round (the last root round) adds every client with no B̄ yet: its probe round."""
        self.probes = set()
        if rnd == self.stages[0]:
            self.probes = {c for c in range(max(clients, self.n_clients)) if not self.tracked.get(c) and c not in sampled}
        return sorted(set(sampled) | self.probes)

    def stage(self, rnd: int) -> str:
        root, cluster = self.stages
        return ROOT if rnd <= root else CLUSTERS if rnd <= root + cluster else LEAVES

    def side_bytes(self, h, rnd, peer=None):
        """The client's cluster id (one int32) down in the switch's round, the last of the root stage."""
        return 0, (4 if rnd == self.stages[0] else 0)

    def declared_elements(self, d, k, r, U, rnd, *, module=None, peer=None):
        return (0, 0) if self.stage(rnd) == LEAVES else super().declared_elements(d, k, r, U, rnd)

    # ---- structure and client side ---------------------------------------------------------------------------
    def prepare(self, model, spec, seed):
        config = spec.peft_config(None)
        config.modules_to_save = None
        add_summed_adapter(model, config)
        self.seed = int(seed)

    def leaf_names(self, h):
        return [n for n in h.trainable_names if f".{LEAF}." in n]

    def frozen(self, h, rnd, peer=None):
        leaf = self.leaf_names(h)
        if self.stage(rnd) != LEAVES:
            return leaf
        kept = set(leaf) | set(self.private(h))
        return [n for n in h.trainable_names if n not in kept]

    def private(self, h):
        return self.leaf_names(h) + super().private(h)

    def loss_term(self, h, peer):
        if not self.root_B:
            return None
        gc, gl, total = self.settings["gamma_c"], self.settings["gamma_l"], None
        for module, keys in h.keys.items():
            B, leaf = h.parameter(keys.B), h.parameter(keys.B.replace(".default.", f".{LEAF}."))
            P = self.root_B[module].to(B.device)
            if leaf.requires_grad:
                term = gc * orthogonality(P, leaf) + gl * orthogonality(B.detach(), leaf)
            elif B.requires_grad:
                term = gc * orthogonality(P, B)
            else:
                continue
            total = term if total is None else total + term
        return total

    # ---- server side -----------------------------------------------------------------------------------------
    def aggregate(self, h, uploads, weights, current, ctx):
        stage = self.stage(ctx.number)
        if stage == LEAVES or not uploads:
            return ServerUpdate(broadcast={})
        if stage == CLUSTERS:
            return self._cluster_round(h, uploads, weights, ctx)
        for peer, upload in zip(ctx.peers, uploads):
            mine = self.tracked.setdefault(peer.cid, {})
            for module, B in h.factors(upload)[0].items():
                if (b := track(mine.get(module), B, self.settings["lam"])) is not None:
                    mine[module] = b
        rooted = [i for i, p in enumerate(ctx.peers) if p.cid not in self.probes] or list(range(len(uploads)))
        if len(rooted) < len(uploads):  # the probes' uploads gave them a B̄; the root rule is the sampled clients'
            w = weights[rooted] / weights[rooted].sum()
            ctx, uploads, weights = replace(ctx, peers=[ctx.peers[i] for i in rooted]), [uploads[i] for i in rooted], w
        update = super().aggregate(h, uploads, weights, current, ctx)  # the root rule and the averaged head
        if ctx.number == self.stages[0]:
            update = self._switch(h, update, ctx)
        return update

    def _switch(self, h, update, ctx):
        """The end of the root stage: cluster the clients; the root tier goes down as a fold."""
        n = max(self.n_clients, max(self.tracked, default=-1) + 1)
        missing = [c for c in range(n) if c not in self.tracked or not self.tracked[c]]
        if missing:
            raise ValueError(f"hilora: clients {missing} have no B̄ to cluster on (never accepted in the root stage, their probe "
                             "round included); raise --fraction or the root stage (--method-options hilora-stages=T_r,T_c)")
        labels, info = spectral_clusters([self.tracked[c] for c in range(n)], h.rank, self.seed)
        self.labels = dict(enumerate(labels))
        leaf = set(self.leaf_names(h))
        broadcast = {k: t for k, t in update.broadcast.items() if k in h.other_names and k not in leaf}  # the head
        for module, layer in update.layers.items():
            broadcast[f"{module}.{FOLD_L}"], broadcast[f"{module}.{FOLD_R}"] = layer.B, layer.A
        head = dict(broadcast)
        self.clusters = {c: {k: head[k] for k in head if FOLD_L not in k and FOLD_R not in k} | self.fresh(h, c)
                         for c in sorted(set(labels))}
        update.broadcast = broadcast
        update.notes = {"hilora_clusters": labels, "hilora_k": info["k"], "hilora_eigengap": info.get("eigengap"),
                        "hilora_distances": [[round(float(x), 6) for x in row] for row in info["distances"]],
                        "hilora_probes": sorted(self.probes)}
        return update

    def _cluster_round(self, h, uploads, weights, ctx):
        for c in sorted(set(self.labels[p.cid] for p in ctx.peers)):
            idx = [i for i, p in enumerate(ctx.peers) if self.labels[p.cid] == c]
            w = weights[idx] / weights[idx].sum()
            sub = replace(ctx, peers=[ctx.peers[i] for i in idx])
            part = super().aggregate(h, [uploads[i] for i in idx], w, self.clusters[c], sub)
            self.clusters[c] = {k: t for k, t in part.broadcast.items() if k in h.trainable_set}
        broadcast = {f"{PREFIX}{c}/{k}": t for c, state in self.clusters.items() for k, t in state.items()}
        return ServerUpdate(broadcast=broadcast, notes={"hilora_clusters": [self.labels[c] for c in sorted(self.labels)]})

    def fresh(self, h, cluster: int):
        """The fresh LoRA of ``cluster`` (-1: the server's, whose B = 0 leaves the root tier alone)."""
        B, A = h.B_names(), h.A_names()
        state = h.fresh_factors(self.seed * 1_000_003 + 7919 * (cluster + 2) + 17)
        return {k: t for k, t in state.items() if k in B or k in A}

    def deliver(self, h, broadcast, peer, seed=None):
        cluster = self.labels.get(peer.cid)
        if cluster is None or not any(k.startswith(PREFIX) or k.endswith(FOLD_L) for k in broadcast):
            return broadcast
        if self._views[0] is not broadcast:
            self._views = (broadcast, {})
        views = self._views[1]
        if cluster not in views:
            if any(k.endswith(FOLD_L) for k in broadcast):  # the switch: the fold and the client's cluster id
                views[cluster] = dict(broadcast) | {CLUSTER: torch.tensor([cluster], dtype=torch.int32)}
            else:
                head = f"{PREFIX}{cluster}/"
                views[cluster] = {k.removeprefix(head): t for k, t in broadcast.items() if k.startswith(head)}
        return views[cluster]

    # ---- applying a broadcast ----------------------------------------------------------------------------------
    def fold(self, h, delivered):
        super().fold(h, delivered)
        for key, t in delivered.items():
            if key.endswith(f".{FOLD_L}"):
                self.root_B[key.removesuffix(f".{FOLD_L}")] = t.detach().clone()

    def take(self, h, delivered, current, peer, seed):
        new = super().take(h, delivered, current, peer, seed)
        if any(k.endswith(FOLD_L) or k.endswith(FOLD) for k in delivered):  # the switch: a fresh LoRA on the folded root
            cluster = int(delivered[CLUSTER][0]) if CLUSTER in delivered else -1
            new |= {k: t.to(current[k].device) for k, t in self.fresh(h, cluster).items()}
        return new

    # ---- checkpoint ----------------------------------------------------------------------------------------------
    def server_state(self):
        out = {f"tracked/{c}/{m}": t for c, mods in self.tracked.items() for m, t in mods.items()}
        out |= {f"root/{m}": t for m, t in self.root_B.items()}
        out |= {f"cluster/{c}/{k}": t for c, state in self.clusters.items() for k, t in state.items()}
        if self.labels:
            out["labels"] = torch.tensor([self.labels[c] for c in sorted(self.labels)], dtype=torch.int64)
        return out

    def load_server_state(self, tensors):
        self.tracked, self.root_B, self.clusters, self.labels = {}, {}, {}, {}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "labels":
                self.labels = {i: int(x) for i, x in enumerate(t.tolist())}
            elif kind == "root":
                self.root_B[rest] = t
            else:
                owner, _, name = rest.partition("/")
                (self.tracked if kind == "tracked" else self.clusters).setdefault(int(owner), {})[name] = t
