"""The in-process federation: one frozen base model in memory, any number of simulated clients.

The round reads top to bottom: sample → local training → upload → aggregate → apply → evaluate. A client is the
set of trainable tensors loaded into the shared model while it trains; between its rounds it keeps only what
its method declares private (FedSA's B and head), so memory grows by that and nothing else. With mixed ranks
(``SimClient.rank``) the model holds the largest rank and a client of rank r_u uses its first r_u components at
scale s(r_u); clients of one rank share one view of the global state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fedlora.adapters import AdapterHandle
from fedlora.aggregation import RULES, aggregate, divergence, eckart_young_bound, get_rule
from fedlora.federation.privacy import (
    EXAMPLE_DP_ADAPTERS,
    ClientAccountants,
    PrivacyConfig,
    dp_sgd_steps,
    epsilon_spent,
    example_rate,
    noise_for_epsilon,
    privatise,
    sample_poisson,
)
from fedlora.federation.protocol import REGISTRY, Method, Peer, RoundContext, ServerUpdate, Tensors
from fedlora.federation.screening import Rejection, check_structure, norm_outliers, schema, update_norm
from fedlora.federation.tasks import ClassificationTask, TokenizedSplit, seed_torch

log = logging.getLogger("fedlora")

WEIGHTINGS = ("examples", "uniform")
OPTIMIZERS = ("adamw", "sgd")


def local_optimizer(params, cfg) -> torch.optim.Optimizer:
    """A fresh local optimizer (clients keep no optimizer state across rounds)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


@dataclass(frozen=True)
class FederationConfig:
    """The round loop's settings. These defaults are the run's (``RunConfig`` takes them from here)."""

    rounds: int = 5
    fraction: float = 1.0
    local_steps: int = 8
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    weighting: str = "examples"
    max_grad_norm: float = 1.0  # clip each local step's gradient norm (0: off); under --dp example the per-example clip replaces it
    optimizer: str = "adamw"  # local optimizer: adamw, or sgd (plain gradient steps: one step of FedEx is then the centralised step)
    device: str = "cpu"
    bound: bool = True  # also compute the Eckart–Young bound per layer (cheap: Gram space)
    max_norm_ratio: float = 10.0  # reject updates above this × the round's median norm (0: off); see screening.py
    similarity: bool = False  # also record the clients' mean pairwise cosine similarity of A and B per module
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # client-level DP (privacy.py)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} is below 1; pass --rounds 1 or more")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} is outside (0, 1]; pass e.g. --fraction 0.5")
        if self.local_steps < 1:
            raise ValueError(f"local_steps={self.local_steps} is below 1; pass --local-steps 1 or more")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is below 1; pass --batch-size 1 or more")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive; pass e.g. --lr 5e-4")
        if self.max_norm_ratio < 0 or (0 < self.max_norm_ratio <= 1):
            raise ValueError(f"max_norm_ratio={self.max_norm_ratio} would reject ordinary clients; pass 0 (off) or a ratio above 1, e.g. 10")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be ≥ 0; pass 0 (off) or a norm such as 1.0")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


@dataclass
class SimClient:
    cid: int
    train: TokenizedSplit
    test: TokenizedSplit
    rank: int | None = None  # the client's adapter rank r_u (None: the model's)


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def round_seed(seed: int, rnd: int, cid: int = -1) -> int:
    return (seed * 1_000_003 + rnd * 10_007 + cid + 1) % (2**63 - 1)


def sample_clients(n_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    m = max(1, int(round(fraction * n_clients)))
    order = torch.randperm(n_clients, generator=torch.Generator().manual_seed(round_seed(seed, rnd)))
    return sorted(order[:m].tolist())


def linear_methods() -> list[str]:
    """The registered methods whose server rule is a weighted sum of the uploads (secure aggregation, central DP)."""
    return [name for name, cls in REGISTRY.items() if cls.linear]


def sample_round(n_clients: int, cfg: FederationConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded fixed-size sample, or under client-level DP Poisson sampling at rate
    ``fraction`` (what the accountant's amplification by sampling assumes)."""
    if cfg.privacy.client_level:
        return sample_poisson(n_clients, cfg.fraction, round_seed(cfg.seed, rnd, -3))
    return sample_clients(n_clients, cfg.fraction, cfg.seed, rnd)


def client_weights(sizes: list[int], weighting: str) -> Tensor:
    w = torch.ones(len(sizes), dtype=torch.float64) if weighting == "uniform" else torch.tensor(sizes, dtype=torch.float64)
    return w / w.sum()


def layer_metrics(h: AdapterHandle, inputs: list[Tensors], weights: Tensor, current: Tensors, update: ServerUpdate, bound: bool):
    """Per adapted module: the aggregation divergence ρ, and (``bound``) the Eckart–Young bound and FedIT's ρ on
    the same uploads, the two references any method's ρ is read against within one run. Under mixed ranks all
    three are in the scaled product space (ΔW* = Σ w_u s_u B_u A_u; FedIT with segment averaging; the bound at
    the largest rank).

    For FedSA (personalised) ΔŴ is what the global model is scored with: Â and the clients' mean B, so ρ measures
    how far that stand-in is from ΔW*; modules whose B no client reported give no entry. A factor no client sent
    because it was frozen (FFA's A, RoLoRA's other factor) is the shared start every client trained against.
    """
    views = [h.factors(t) for t in inputs]
    B0, A0 = h.factors(current)  # a factor not sent this round (frozen) is the shared start
    rho, rho_min, rho_fedit = {}, {}, {}
    for module, layer in update.layers.items():
        if layer.B is None and layer.eval_B is None:  # FedSA with no client's B to score: nothing to measure
            continue
        Bs = [v[0].get(module, B0[module]) for v in views]
        As = [v[1].get(module, A0[module]) for v in views]
        rho[module] = float(divergence(Bs, As, weights, layer, scales=update.scales))
        if bound:
            rho_min[module] = float(eckart_young_bound(Bs, As, weights, scales=update.scales))
            fedit = aggregate("fedit", Bs, As, weights, scales=update.scales)
            rho_fedit[module] = float(divergence(Bs, As, weights, fedit, scales=update.scales))
    return (rho or None), (rho_min or None), (rho_fedit or None)


def mean_pairwise_cosine(tensors: list[Tensor]) -> float | None:
    """Mean over client pairs u < v of cos(X_u, X_v), the tensors flattened (None below two clients).

    A zero tensor has no direction; its pairs count as 0. O(U²·size) through one Gram matrix.
    """
    if len(tensors) < 2:
        return None
    shape = [max(t.shape[i] for t in tensors) for i in range(tensors[0].dim())]  # mixed ranks: zero-padded
    X = torch.stack([_padded(t.detach().to(torch.float64), shape).reshape(-1) for t in tensors])
    norms = X.norm(dim=1)
    X = X / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    G = X @ X.T
    U = len(tensors)
    return float((G.sum() - G.diagonal().sum()) / (U * (U - 1)))


def _padded(t: Tensor, shape: list[int]) -> Tensor:
    if list(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def similarity_metrics(h: AdapterHandle, method: Method, inputs: list[Tensors], current: Tensors) -> dict[str, dict[str, float] | None]:
    """Mean pairwise cosine similarity across the round's clients, per adapted module, of the factors they hold
    after local training (``A``, ``B``; FedSA-LoRA's Figure 2) and of their local updates relative to the round's
    broadcast (``dA``, ``dB``: the factor minus the start every client shared, which removes the common
    initialisation). A factor a client does not train (FFA's frozen A) is identical across clients (cos 1, no
    update); a private factor (FedSA's B) has no common start, so its update similarity is not defined."""
    views = [h.factors(t) for t in inputs]
    B0, A0 = h.factors(current)
    private = set(method.private(h))
    out: dict[str, dict[str, float] | None] = {}
    for kind, idx, start in (("B", 0, B0), ("A", 1, A0)):
        fac, upd = {}, {}
        for module in h.keys:
            tensors = [v[idx].get(module, start.get(module)) for v in views]
            if any(t is None for t in tensors):
                continue
            fac[module] = mean_pairwise_cosine(tensors)
            name = getattr(h.keys[module], kind)
            if name in private or module not in start or not any(name in t for t in inputs):
                continue  # no common start (private) or never trained (frozen): no update to compare
            upd[module] = mean_pairwise_cosine([t - _cut(start[module], t) for t in tensors])
        out[f"similarity_{kind}_per_layer"] = {k: v for k, v in fac.items() if v is not None} or None
        out[f"similarity_d{kind}_per_layer"] = {k: v for k, v in upd.items() if v is not None} or None
    for kind in ("A", "B", "dA", "dB"):
        out[f"similarity_{kind}"] = _mean(out[f"similarity_{kind}_per_layer"])
    return out


def _cut(start: Tensor, t: Tensor) -> Tensor:
    """The common start cut to a client's shape (mixed ranks: its first r_u components, before its rescale)."""
    return start[tuple(slice(0, n) for n in t.shape)] if start.shape != t.shape else start


def _mean(values: dict[str, float] | None) -> float | None:
    return None if not values else sum(values.values()) / len(values)


def train_local(model: nn.Module, task, train: TokenizedSplit, cfg: FederationConfig, seed: int,
                loss_term: Callable[[], Tensor | None] | None = None) -> float:
    """A client's local steps on the model as loaded; fresh AdamW each round (clients keep no optimizer state).
    ``loss_term``: the method's extra term added to each step's loss (HetLoRA's regulariser). Under example-level DP
    the steps are DP-SGD (``privacy.dp_sgd_steps``)."""
    if cfg.privacy.example_level:
        return dp_sgd_steps(model, task, train, cfg, seed, cfg.privacy, loss_term)
    seed_torch(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = local_optimizer(params, cfg)
    model.train()
    n, order, pos, losses = len(train), torch.empty(0, dtype=torch.long), 0, []
    for _ in range(cfg.local_steps):
        if pos >= len(order):  # a fresh seeded pass over the client's shard
            order, pos = torch.randperm(n, generator=gen), 0
        index = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = task.loss(model, train.batch(index, cfg.device))
        extra = loss_term() if loss_term else None
        (loss if extra is None else loss + extra).backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


@dataclass
class SecureSum:
    """What the server learns in a securely aggregated round: the weighted mean of the accepted clients' uploads and
    eval extras (one tensor dict), and the bytes the protocol moved (keys, shares, masked vectors)."""

    mean: Tensors
    bytes_up: int
    bytes_down: int


@dataclass
class ClientResult:
    """What one client's turn produced: its upload (protocol bytes), eval-only extras, private state, scores."""

    cid: int
    upload: Tensors
    extras: Tensors
    private: Tensors
    n_train: int
    n_test: int
    local_accuracy: float
    train_loss: float


def peer_of(h: AdapterHandle, client: SimClient) -> Peer:
    rank = h.rank if client.rank is None else client.rank
    return Peer(client.cid, rank, h.spec.scale_at(rank))


def client_turn(h: AdapterHandle, method: Method, task, client: SimClient, start: Tensors, cfg: FederationConfig, rnd: int) -> ClientResult:
    """Load the client's start state at its rank, train the round's trainables, score it on its own test shard,
    and split what it holds into upload, eval extras and private state."""
    peer = peer_of(h, client)
    h.set(start, rank=peer.rank)
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, rnd), False)  # per round: RoLoRA alternates, FFA always freezes A
    seed = round_seed(cfg.seed, rnd, client.cid)
    loss = train_local(h.model, task, client.train, cfg, seed, lambda: method.loss_term(h, peer))
    method.local_training(h, lambda: train_local(h.model, task, client.train, cfg, seed + 1))
    with method.local_scoring(h, client.train, cfg.device):
        acc = task.evaluate(h.model, client.test, cfg.device)
    trained = h.get(rank=peer.rank)
    return ClientResult(
        cid=client.cid, upload=method.upload(h, trained, rnd, start), extras=method.eval_extras(h, trained),
        private={n: trained[n] for n in method.private(h)}, n_train=len(client.train), n_test=len(client.test),
        local_accuracy=acc, train_loss=loss,
    )


def screen(h: AdapterHandle, method: Method, results: list[ClientResult], held: Callable[[int], Tensors], cfg: FederationConfig,
           rnd: int) -> tuple[list[ClientResult], list[Rejection]]:
    """Split the round's results into accepted and rejected (structure, dtype, NaN/Inf, norm outliers). Each client
    is checked against what it started from (``held(cid)``: its own rank under mixed ranks)."""
    accepted, rejected, norms = [], [], []
    for r in results:
        start = held(r.cid)
        reason = (check_structure(r.cid, r.upload, schema(method.upload(h, start, rnd)), "upload")
                  or check_structure(r.cid, r.extras, schema(method.eval_extras(h, start)), "evaluation tensors"))
        if reason:
            rejected.append(Rejection(r.cid, reason))
        else:
            accepted.append(r)
            norms.append(update_norm(r.upload, start))
    outliers = norm_outliers([r.cid for r in accepted], norms, cfg.max_norm_ratio)
    bad = {o.cid for o in outliers}
    return [r for r in accepted if r.cid not in bad], rejected + outliers


def server_memory_bytes(h: AdapterHandle, U: int, *, quadratic: bool = False) -> int:
    """A bound on the server step's working memory for U clients per round, per adapted matrix (one at a time):
    the stacked U·r(d+k) factors in float64 a few times over (the rules' stacks, the divergence metric's QRs) and
    the Grams of the stacked-factor rules, (U·r)² each: at most ``svd.EXACT_MAX_COLUMNS``² for the rules that
    switch to their randomized/iterative paths above it, every (U·r)² for a ``quadratic`` rule (FedMomentum)."""
    from fedlora.aggregation.svd import EXACT_MAX_COLUMNS

    n = U * h.rank
    gram = n if quadratic else min(n, EXACT_MAX_COLUMNS)
    worst = max((3 * gram**2 + 3 * n * (layer.out_features + layer.in_features)) for layer in h.layers.values())
    return 8 * worst


def check_server_memory(h: AdapterHandle, U: int, *, quadratic: bool = False) -> None:
    """Refuse, before any training, a configuration whose server step cannot fit in this machine's memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = server_memory_bytes(h, U, quadratic=quadratic)
    if need > total // 2:
        raise ValueError(f"the server step for {U} clients per round at rank {h.rank} needs about {need / 2**30:.1f} GiB, more than half of "
                         f"this machine's {total / 2**30:.1f} GiB; lower --rank, --clients or --fraction")


def finish_metrics(metrics: dict, global_accuracy: float, wall_seconds: float) -> dict:
    """Add the global score, the local–global gap and the wall time, in the order metrics.jsonl shows them."""
    out = {k: metrics[k] for k in ("round", "method", "clients", "train_loss")}
    out |= {"global_accuracy": global_accuracy, "local_accuracy": metrics["local_accuracy"],
            "local_global_gap": metrics["local_accuracy"] - global_accuracy}
    out |= {k: v for k, v in metrics.items() if k not in out}
    out["wall_seconds"] = wall_seconds
    return out


@dataclass
class Simulator:
    """Runs a method over clients on one shared PEFT model. ``run()`` returns one metrics dict per round."""

    model: nn.Module
    handle: AdapterHandle
    method: Method
    clients: list[SimClient]
    global_test: TokenizedSplit
    config: FederationConfig = field(default_factory=FederationConfig)
    task: object = field(default_factory=ClassificationTask)
    on_client: Callable[[int, int], None] | None = None  # (round, cid) after each client trains
    on_round: Callable[[dict], None] | None = None
    turn: Callable[..., ClientResult] = client_turn  # one client's turn; swappable, e.g. to inject faulty clients

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("no clients to federate; pass --clients 1 or more")
        h = self.handle
        self.model.to(self.config.device)
        self.peers: list[Peer] = [peer_of(h, c) for c in self.clients]
        for p in self.peers:
            if not 1 <= p.rank <= h.rank:
                raise ValueError(f"client {p.cid} has rank {p.rank} but the model's adapter has rank {h.rank}; build it at the largest client rank")
        self.mixed = any(p.rank != h.rank for p in self.peers)
        rule = get_rule(self.method.rule) if self.method.rule in RULES else None
        check_server_memory(h, max(1, int(round(self.config.fraction * len(self.clients)))), quadratic=bool(rule and rule.quadratic))
        self.accountants = None
        if self.config.privacy.enabled:
            self._check_privacy()
        self.server = Peer(-1, h.rank, h.spec.scale_at(h.rank))
        self.global_tensors: Tensors = h.get()
        self.eval_tensors: Tensors = self.global_tensors
        # What each client starts its next round from (before its private state): the global state at its rank.
        # Round 1: the seeded init, each client's first r_u components (as PEFT would initialise it at r_u).
        views = {r: self.global_tensors if r == h.rank else h.truncate(self.global_tensors, r) for r in {p.rank for p in self.peers}}
        self.held: dict[int, Tensors] = {p.cid: views[p.rank] for p in self.peers}
        self.private: dict[int, Tensors] = {}
        self.history: list[dict] = []
        self.setup_bytes: tuple[int, int] | None = None  # round 0's (up, down), counted in round 1's row
        # Catch-up: the last round whose broadcast each client has been sent (and counted), and each round's broadcast
        # size per client rank, so a client that missed rounds pays for the broadcasts it is sent when next sampled.
        self.sent: dict[int, int] = {p.cid: 0 for p in self.peers}
        self.broadcast_bytes: dict[int, dict[int, int]] = {}
        self.set_up = False  # round 0 done (or not needed once a round has run)

    # -- round 0: the method's initialisation round, when it has one -----------------------------------------------
    def setup(self) -> None:
        """Every client sends ``method.setup_upload`` from the initial state; the server's ``setup_aggregate`` is
        applied to every client's view and its own model before round 1 (Fed-SB's federated gradient init)."""
        h, method, cfg = self.handle, self.method, self.config
        results = []
        for client in self.clients:
            h.set(self.held[client.cid], rank=self.peers[client.cid].rank)
            try:
                results.append((client.cid, method.setup_upload(h, self.task, client.train, cfg), len(client.train)))
            except Exception as exc:  # as in a round: a failing client is left out, the run goes on
                log.warning("round 0: client %d raised %s: %s; left out of the initialisation", client.cid, type(exc).__name__, exc)
        h.set(self.global_tensors)
        self.close_setup(results)

    def close_setup(self, results: list[tuple[int, Tensors, int]]) -> Tensors:
        """The server half of round 0, shared with the Flower strategy: ``results`` are (cid, upload, n_train).
        Returns the broadcast, already applied here."""
        h, method, cfg = self.handle, self.method, self.config
        if not results:
            raise ValueError(f"no client answered {method.name}'s initialisation round; check the clients' logs and restart the run")
        bad = [cid for cid, u, _ in results if not all(bool(torch.isfinite(t).all()) for t in u.values())]
        for cid in bad:
            log.warning("round 0: client %d sent non-finite values; left out of the initialisation", cid)
        results = [r for r in results if r[0] not in bad]
        if not results:
            raise ValueError(f"no client sent a usable answer in {method.name}'s initialisation round; check the clients' data and restart the run")
        weights = client_weights([n for _, _, n in results], cfg.weighting)
        broadcast = method.setup_aggregate(h, [u for _, u, _ in results], weights, self.global_tensors)
        up = sum(nbytes(u) for _, u, _ in results)
        down = sum(nbytes(method.deliver(h, broadcast, p)) for p in self.peers)
        self._apply(ServerUpdate(broadcast=broadcast), round_seed(cfg.seed, 0))
        h.set(self.global_tensors)
        self.setup_bytes, self.set_up = (up, down), True
        return broadcast

    def _check_privacy(self) -> None:
        """Refuse what DP cannot cover and fix the noise for a target ε. Client-level: also replace the weighting and
        norm screening (uniform weights bound the sensitivity; the clipping bounds every update)."""
        cfg, method = self.config, self.method
        if method.needs_setup():
            raise ValueError(f"--dp {cfg.privacy.mode} does not cover {method.name}'s setup round (its uploads are not clipped or noised); "
                             "choose a setup-free option (e.g. --fedsb-init random)")
        if cfg.privacy.example_level:
            kind = self.handle.spec.kind
            if not self.handle.kind.per_example_grads:
                raise ValueError(f"--dp example needs per-example gradients, which Opacus computes for {' and '.join(EXAMPLE_DP_ADAPTERS)} "
                                 f"layers but not for {kind}'s (DoRA's magnitude, VeRA's and HiRA's vectors); pass --adapter lora or rslora")
            privacy = cfg.privacy
            if privacy.target_epsilon is not None:  # the client that samples fastest and joins every round meets it
                rate = max(example_rate(cfg.batch_size, len(c.train)) for c in self.clients)
                privacy = dataclasses.replace(privacy, noise=noise_for_epsilon(privacy.target_epsilon, privacy.delta, rate,
                                                                               cfg.rounds * cfg.local_steps, privacy.accountant),
                                              target_epsilon=None)
            self.config = dataclasses.replace(cfg, privacy=privacy)
            self.accountants = ClientAccountants(privacy)
            return
        if not method.is_linear():
            raise ValueError(f"--dp client needs a method whose server rule is a weighted sum of the uploads (linear: "
                             f"{', '.join(linear_methods())}); {method.name} needs each client's factors")
        if self.mixed:
            raise ValueError("--dp client with mixed client ranks is not supported; drop --client-ranks")
        if cfg.weighting != "uniform":
            log.warning("--dp client: client weights are uniform (the sensitivity needs bounded weights); --weighting %s is ignored", cfg.weighting)
        privacy = cfg.privacy.resolved(sample_rate=cfg.fraction, rounds=cfg.rounds)
        self.config = dataclasses.replace(cfg, privacy=privacy, weighting="uniform", max_norm_ratio=0.0)

    def privacy_metrics(self, rnd: int) -> dict:
        p, cfg = self.config.privacy, self.config
        if not p.enabled:
            return {}
        if p.example_level:  # the largest ε any client has spent so far, and each client's
            per_client = {cid: self.accountants.epsilon(cid) for cid in sorted(self.accountants.history)}
            return {"epsilon": max(per_client.values(), default=0.0), "epsilon_per_client": per_client, "delta": p.delta,
                    "dp_noise_multiplier": p.noise, "dp_clip": p.clip, "dp_accountant": p.accountant}
        return {"epsilon": epsilon_spent(p.noise, cfg.fraction, rnd, p.delta, p.accountant), "delta": p.delta,
                "dp_noise_multiplier": p.noise, "dp_clip": p.clip, "dp_accountant": p.accountant}

    # -- the round: sample → local training → upload → aggregate → apply → evaluate ------------------------------
    def round(self, rnd: int) -> dict:
        cfg, h, method = self.config, self.handle, self.method
        start = time.perf_counter()
        if not self.history and not self.set_up and method.needs_setup():
            self.setup()
        results, failed = [], []
        for cid in sample_round(len(self.clients), cfg, rnd):
            try:
                results.append(self.turn(h, method, self.task, self.clients[cid], self.held[cid] | self.private.get(cid, {}), cfg, rnd))
            except Exception as exc:  # a failing client is data, not the end of the run
                failed.append(Rejection(cid, f"client {cid} raised {type(exc).__name__} during its turn: {exc}"))
            if self.on_client:
                self.on_client(rnd, cid)
        _, _, metrics = self.close_round(results, failed, rnd, start)
        return metrics

    def close_round(self, results: list[ClientResult], failed: list[Rejection], rnd: int, started: float,
                    secure: SecureSum | None = None):
        """The server half of a round, the one path shared with the Flower strategy: screen, aggregate, apply the
        broadcast to the server's model and every client's view, keep accepted clients' private state, score the
        global model, record the metrics. Returns (update or None when no client is left, accepted, metrics).

        ``secure``: the round ran under secure aggregation, so ``results`` carry each client's scores but no tensors
        and the server holds only the weighted mean of their uploads and extras. A linear rule is applied to that mean
        alone (the same update as on the uploads); nothing per client can be screened or measured (ρ, bound,
        similarity are None); the bytes are the protocol's."""
        cfg, h, method = self.config, self.handle, self.method
        if secure is not None:
            received = secure.bytes_up
            accepted, rejected = list(results), list(failed)  # SecAgg+'s clipping range is the only bound on an upload
        else:
            received = sum(nbytes(r.upload) for r in results if isinstance(r.upload, dict) and all(isinstance(t, Tensor) for t in r.upload.values()))
            accepted, rejected = screen(h, method, results, self.held.__getitem__, cfg, rnd)
            rejected = list(failed) + rejected
        for rej in rejected:
            log.warning("round %d: rejected %s", rnd, rej.reason)
        catch_up = self._catch_up({r.cid for r in results} | {f.cid for f in failed}, rnd)
        metrics = {
            "round": rnd, "method": method.name, "clients": [r.cid for r in accepted],
            "train_loss": sum(r.train_loss for r in accepted) / len(accepted) if accepted else math.nan,
            "local_accuracy": math.nan,
        }
        rho = rho_min = rho_fedit = None
        update, down, seconds = None, 0, 0.0
        setup, self.setup_bytes = self.setup_bytes or (0, 0), None  # round 0's bytes go into the first round's row
        dp = cfg.privacy
        if dp.example_level:  # every client that trained spent privacy, accepted or not
            for cid in [r.cid for r in results] + [f.cid for f in failed]:
                self.accountants.spend(cid, example_rate(cfg.batch_size, len(self.clients[cid].train)), cfg.local_steps)
        if accepted or dp.client_level:  # under DP a round nobody joined still releases its noise
            inputs = [r.upload | r.extras for r in accepted]
            weights = client_weights([r.n_train for r in accepted], cfg.weighting)  # renormalised over accepted clients
            seed = round_seed(cfg.seed, rnd)
            peers = [self.peers[r.cid] for r in accepted]
            if dp.client_level:
                template = None if accepted else method.upload(h, self.global_tensors, rnd)
                uploads, diag = privatise([r.upload for r in accepted], [self.held[r.cid] for r in accepted], dp,
                                          cfg.fraction * len(self.clients), round_seed(cfg.seed, rnd, -2), template)
                inputs = [u | r.extras for u, r in zip(uploads, accepted)] if accepted else uploads
                peers = peers or [self.server]
                weights = client_weights([1] * len(inputs), "uniform")
                metrics |= {"dp_clipped": diag["clipped"], "dp_noise_std": diag["noise_std"]}
            if secure is not None:  # one input, the weighted mean: a linear rule gives the same update from it
                inputs, weights, peers = [secure.mean], client_weights([1], "uniform"), peers[:1]
                metrics["secure_aggregation"] = True
            ctx = RoundContext(rnd, seed, peers, mixed=self.mixed)
            t_agg = time.perf_counter()
            update = method.aggregate(h, inputs, weights, self.global_tensors, ctx)
            seconds = time.perf_counter() - t_agg
            if secure is None:
                rho, rho_min, rho_fedit = layer_metrics(h, inputs, weights, self.global_tensors, update, cfg.bound)
            if cfg.similarity and secure is None:
                metrics |= similarity_metrics(h, method, inputs, self.global_tensors)
            n_local = sum(r.n_test for r in accepted)
            metrics["local_accuracy"] = sum(r.local_accuracy * r.n_test for r in accepted if r.n_test) / n_local if n_local else math.nan
            sizes = {}
            for peer in self.peers:  # the broadcast's size for each client rank (catch-up later costs the same)
                if peer.rank not in sizes:
                    sizes[peer.rank] = nbytes(method.deliver(h, update.broadcast, peer))
            self.broadcast_bytes[rnd] = sizes
            down = sum(sizes[self.peers[r.cid].rank] for r in accepted)
            for r in accepted:
                self.sent[r.cid] = rnd
            down += secure.bytes_down if secure is not None else 0
            self._apply(update, seed)
            for r in accepted:
                if r.private:
                    self.private[r.cid] = r.private
        else:
            log.warning("round %d: no client left after screening; round skipped, global model unchanged", rnd)
        metrics |= self.privacy_metrics(rnd)
        metrics |= {
            "divergence": _mean(rho), "divergence_per_layer": rho, "bound": _mean(rho_min), "bound_per_layer": rho_min,
            "fedit_divergence": _mean(rho_fedit), "fedit_divergence_per_layer": rho_fedit,
            "bytes_up": received + setup[0], "bytes_down": down + setup[1] + catch_up, "catch_up_bytes": catch_up,
            "aggregation_seconds": seconds,
            "rejected": [r.as_dict() for r in rejected], "n_rejected": len(rejected), "skipped": not accepted,
        }
        if not method.communicates:  # a reference point (central, local): nothing crosses a network
            metrics["bytes_up"] = metrics["bytes_down"] = metrics["catch_up_bytes"] = 0
        states = method.scored_states(self.held, self.private)
        if states:  # e.g. `local`: the mean of the clients' own models on the global test set
            scores = []
            for state in states:
                h.set(state)
                scores.append(self.task.evaluate(self.model, self.global_test, cfg.device))
            global_acc = sum(scores) / len(scores)
        else:
            h.set(self.eval_tensors)
            global_acc = self.task.evaluate(self.model, self.global_test, cfg.device)
            if hasattr(self.task, "global_metrics"):  # e.g. the synthetic task's loss against its known floor
                metrics |= self.task.global_metrics(self.model, self.global_test, cfg.device)
        h.set(self.global_tensors)
        metrics = finish_metrics(metrics, global_acc, time.perf_counter() - started)
        self.history.append(metrics)
        if self.on_round:
            self.on_round(metrics)
        return update, accepted, metrics

    def _apply(self, update: ServerUpdate, seed: int) -> None:
        """Fold once into the shared base (it serves every client), then move the server's model and every client's
        view (sampled or not: Flower clients catch up on the broadcasts they missed) to the round's state. Clients
        holding the same view at the same rank keep sharing one."""
        h, method = self.handle, self.method
        method.fold(h, update.broadcast)
        old = self.global_tensors
        self.global_tensors = method.take(h, update.broadcast, old, self.server, seed)
        self.eval_tensors = update.eval_tensors if update.eval_tensors is not None else self.global_tensors
        def key(view: Tensors, delivered: Tensors, rank: int) -> tuple:
            return id(view), rank, tuple((n, id(t)) for n, t in delivered.items())

        moved = {key(old, update.broadcast, h.rank): self.global_tensors}
        views = dict(self.held)  # every old view stays alive (and its id unique) until all are moved
        for p in self.peers:
            delivered = method.deliver(h, update.broadcast, p)
            k = key(views[p.cid], delivered, p.rank)
            if k not in moved:
                moved[k] = method.take(h, delivered, views[p.cid], p, seed)
            self.held[p.cid] = moved[k]

    def run(self) -> list[dict]:
        for rnd in range(len(self.history) + 1, self.config.rounds + 1):
            self.round(rnd)
        return self.history

    # -- checkpoints: everything a resumed run needs to continue bit-for-bit ------------------------------------
    def _catch_up(self, sampled: set[int], rnd: int) -> int:
        """Bytes of the broadcasts the round's sampled clients missed (rounds after the last one they were sent, before
        this one): what their train message carries besides the last round's broadcast, as on Flower."""
        total = 0
        for cid in sampled:
            if cid not in self.sent:
                continue
            rank = self.peers[cid].rank
            total += sum(self.broadcast_bytes.get(r, {}).get(rank, 0) for r in range(self.sent[cid] + 1, rnd))
            self.sent[cid] = max(self.sent[cid], rnd - 1)
        oldest = min(self.sent.values(), default=rnd)
        self.broadcast_bytes = {r: b for r, b in self.broadcast_bytes.items() if r > oldest}
        return total

    def snapshot(self) -> tuple[Tensors, dict]:
        """(tensors, meta) after the last completed round: global and scored trainables, each client's view where
        it is not the global one (mixed ranks), each client's private state, and for methods that fold into the
        base the current base weights of the adapted modules."""
        h = self.handle
        tensors = {f"global/{n}": t for n, t in self.global_tensors.items()}
        # FedSA scores with tensors clients never start from; elsewhere eval and global are the same tensors.
        tensors |= {f"eval/{n}": t for n, t in self.eval_tensors.items() if t is not self.global_tensors.get(n)}
        for cid, view in self.held.items():
            tensors |= {f"held/{cid}/{n}": t.clone() for n, t in view.items() if t is not self.global_tensors.get(n)}
        for cid, priv in self.private.items():
            tensors |= {f"private/{cid}/{n}": t for n, t in priv.items()}
        for module, folded in h.folded.items():
            tensors[f"base/{module}"] = h.layers[module].get_base_layer().weight.detach()
            tensors[f"folded/{module}"] = folded
        meta = {"round": len(self.history), "history": self.history, "sent": self.sent, "broadcast_bytes": self.broadcast_bytes}
        if self.accountants is not None:
            meta["dp_accountants"] = self.accountants.state()
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    @torch.no_grad()
    def restore(self, tensors: Tensors, meta: dict) -> None:
        h, device = self.handle, self.config.device
        self.global_tensors, self.eval_tensors, self.private = {}, {}, {}
        held: dict[int, Tensors] = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            t = t.to(device)
            if kind == "global":
                self.global_tensors[rest] = t
            elif kind == "eval":
                self.eval_tensors[rest] = t
            elif kind in ("private", "held"):
                cid, _, name = rest.partition("/")
                (self.private if kind == "private" else held).setdefault(int(cid), {})[name] = t
            elif kind == "base":
                h.layers[rest].get_base_layer().weight.copy_(t)
            elif kind == "folded":
                h.folded[rest] = t
        self.eval_tensors = dict(self.global_tensors) | self.eval_tensors
        self.held = {p.cid: self.global_tensors | held[p.cid] if p.cid in held else self.global_tensors for p in self.peers}
        h.set(self.global_tensors)
        self.history = list(meta["history"])
        rounds = len(self.history)  # a checkpoint from before catch-up was counted: every client as if sent everything
        self.sent = {int(c): int(r) for c, r in meta.get("sent", {p.cid: rounds for p in self.peers}).items()}
        self.broadcast_bytes = {int(r): {int(k): int(v) for k, v in b.items()} for r, b in meta.get("broadcast_bytes", {}).items()}
        if self.accountants is not None:
            self.accountants.load(meta.get("dp_accountants", {}))
        self.set_up = bool(self.history)

    def global_state(self) -> Tensors:
        """Trainables of the global model as scored (FedSA: Â with the clients' mean B and head)."""
        return dict(self.eval_tensors)
