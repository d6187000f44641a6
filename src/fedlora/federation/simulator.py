"""The in-process federation: one frozen base model in memory, any number of simulated clients.

The round reads top to bottom: sample → local training → upload → aggregate → apply → evaluate. A client is the
set of trainable tensors loaded into the shared model while it trains; between its rounds it keeps only what
its method declares private (FedSA's B and head), so memory grows by that and nothing else. With mixed ranks
(``SimClient.rank``) the model holds the largest rank and a client of rank r_u uses its first r_u components at
scale s(r_u); clients of one rank share one view of the global state.

The server half of a round (:meth:`Simulator.close_round`, which the Flower strategy runs too) is a few short steps:
screen, count what arrived, take the round's inputs one of three ways (plain, client-level DP, secure sum:
:mod:`fedlora.federation.server_round`), the one aggregation step, broadcast and apply, score, record. Bytes are
added up only by the run's ledger (:class:`~fedlora.federation.traffic.Traffic`), privacy state is kept by
:class:`~fedlora.federation.privacy.RunPrivacy`.
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
from fedlora.aggregation import RULES, get_rule
from fedlora.federation.privacy import PrivacyConfig, dp_sgd_steps, example_rate, sample_poisson, settle_privacy
from fedlora.federation.protocol import Method, Peer, RoundContext, ServerUpdate, Tensors, is_state, linear_methods
from fedlora.federation.screening import Rejection
from fedlora.federation.server_opt import ServerOptConfig, ServerOptimizer
from fedlora.federation.server_round import (
    ClientResult,
    Measures,
    RoundInputs,
    SecureSum,
    aggregate_step,
    client_dp_inputs,
    client_weights,
    finish_metrics,
    layer_metrics,
    local_scores,
    mean_pairwise_cosine,
    plain_inputs,
    screen,
    secure_inputs,
    similarity_metrics,
)
from fedlora.federation.systems import Instant
from fedlora.federation.tasks import ClassificationTask, TokenizedSplit, seed_torch
from fedlora.federation.traffic import RoundBytes, Traffic, nbytes

# Names other modules import from here (the round's steps live in server_round.py, the byte ledger in traffic.py).
__all__ = [
    "ClientResult", "FederationConfig", "SecureSum", "SimClient", "Simulator", "check_server_memory", "client_turn",
    "client_weights", "finish_metrics", "layer_metrics", "linear_methods", "local_optimizer", "mean_pairwise_cosine",
    "nbytes", "round_clients", "round_seed", "sample_clients", "sample_round", "screen", "server_memory_bytes", "similarity_metrics",
    "train_local", "round_lr", "LR_SCHEDULES", "corrected", "finish_turn",
]

log = logging.getLogger("fedlora")

WEIGHTINGS = ("examples", "uniform")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")


def round_lr(cfg, rnd: int) -> float:
    """The local learning rate of round ``rnd``: ``lr`` throughout (constant), or cosine-annealed from ``lr`` towards
    ``lr_min`` over the rounds, FlowerTune's schedule: lr_min + ½(lr − lr_min)(1 + cos(π·rnd/rounds)), so the last
    round trains at lr_min."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * rnd / cfg.rounds))


def local_optimizer(params, cfg, lr_factors: dict[int, float] | None = None) -> torch.optim.Optimizer:
    """A fresh local optimizer (clients keep no optimizer state across rounds). ``lr_factors``: multipliers of the
    lr by ``id(parameter)`` (``Method.learning_rates``); the others train at ``cfg.lr``."""
    params = list(params)
    if lr_factors:
        groups: dict[float, list] = {}
        for p in params:
            groups.setdefault(float(lr_factors.get(id(p), 1.0)), []).append(p)
        params = [{"params": ps, "lr": cfg.lr * f} for f, ps in groups.items()]
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
    lr_schedule: str = "constant"  # constant, or cosine from lr to lr_min over the rounds (round_lr)
    lr_min: float = 0.0
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)  # the server optimiser on the method's result (server_opt.py)
    clients_together: str = "auto"  # auto, on or off: the round's clients trained in one pass over the base (together.py)
    together_group: int = 32  # at most this many clients per joint pass (its activations are held at once)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} is below 1; pass --rounds 1 or more")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} is outside (0, 1]; pass e.g. --fraction 0.5")
        if self.local_steps < 1:
            raise ValueError(f"local_steps={self.local_steps} is below 1; pass --local-steps 1 or more")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is below 1; pass --batch-size 1 or more")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a finite positive number; pass e.g. --lr 5e-4")
        if self.max_norm_ratio < 0 or (0 < self.max_norm_ratio <= 1):
            raise ValueError(f"max_norm_ratio={self.max_norm_ratio} would reject ordinary clients; pass 0 (off) or a ratio above 1, e.g. 10")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be ≥ 0; pass 0 (off) or a norm such as 1.0")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "cosine" and not 0 <= self.lr_min < self.lr:
            raise ValueError(f"lr_min={self.lr_min} must lie in [0, lr={self.lr}) for the cosine schedule; pass e.g. --lr-min 1e-6")
        if self.clients_together not in ("auto", "on", "off"):
            raise ValueError(f"unknown --clients-together {self.clients_together!r}; choose one of auto, on, off")
        if self.together_group < 1:
            raise ValueError(f"together_group={self.together_group} is below 1; pass --clients-together-group 1 or more")


@dataclass
class SimClient:
    cid: int
    train: TokenizedSplit
    test: TokenizedSplit
    rank: int | None = None  # the client's adapter rank r_u (None: the model's)


def round_seed(seed: int, rnd: int, cid: int = -1) -> int:
    return (seed * 1_000_003 + rnd * 10_007 + cid + 1) % (2**63 - 1)


def sample_clients(n_clients: int, fraction: float, seed: int, rnd: int, count: int | None = None) -> list[int]:
    """The round's seeded sample of round(fraction·n) clients; ``count``: that many from the same seeded order instead
    (over-selection: a superset of the plain sample)."""
    m = max(1, int(round(fraction * n_clients))) if count is None else count
    order = torch.randperm(n_clients, generator=torch.Generator().manual_seed(round_seed(seed, rnd)))
    return sorted(order[:m].tolist())


def sample_round(n_clients: int, cfg: FederationConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded fixed-size sample, or under client-level DP Poisson sampling at rate
    ``fraction`` (what the accountant's amplification by sampling assumes)."""
    if cfg.privacy.client_level:
        return sample_poisson(n_clients, cfg.fraction, round_seed(cfg.seed, rnd, -3))
    return sample_clients(n_clients, cfg.fraction, cfg.seed, rnd)


def round_clients(n_clients: int, cfg: FederationConfig, rnd: int, method: Method) -> list[int]:
    """Who trains in round ``rnd``: the seeded sample (:func:`sample_round`) as the method extends it
    (:meth:`Method.participants`: HiLoRA's probe round)."""
    return method.participants(rnd, sample_round(n_clients, cfg, rnd), n_clients)


def train_local(model: nn.Module, task, train: TokenizedSplit, cfg: FederationConfig, seed: int,
                loss_term: Callable[[], Tensor | None] | None = None, after_step: Callable[[], None] | None = None,
                lr_factors: dict[int, float] | None = None) -> float:
    """A client's local steps on the model as loaded; fresh AdamW each round (clients keep no optimizer state).
    ``loss_term``: the method's extra term added to each step's loss (HetLoRA's regulariser); ``after_step``: called
    after every optimizer step (LoRA-A²'s mask reset); ``lr_factors``: lr multipliers by ``id(parameter)``. Under
    example-level DP the steps are DP-SGD (``privacy.dp_sgd_steps``)."""
    if cfg.privacy.example_level:
        return dp_sgd_steps(model, task, train, cfg, seed, cfg.privacy, loss_term, after_step, lr_factors)
    seed_torch(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = local_optimizer(params, cfg, lr_factors)
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
        if after_step:
            after_step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def corrected(params: dict[str, Tensor], correction: Tensors, lrs: dict[str, float], after: Callable[[], None]) -> Callable[[], None]:
    """The hook run after every optimizer step: ``x ← x − η_x·d_x`` for each ``params[x]`` with a direction ``d_x`` in
    ``correction`` (:meth:`Method.step_correction`; η_x = ``lrs[x]``), then ``after`` (:meth:`Method.after_step`)."""

    @torch.no_grad()
    def hook() -> None:
        for n, d in correction.items():
            params[n].sub_(d.to(params[n].dtype), alpha=lrs[n])
        after()

    return hook


def peer_of(h: AdapterHandle, client: SimClient, method: Method | None = None) -> Peer:
    rank = h.rank if client.rank is None else client.rank
    return Peer(client.cid, rank, h.spec.scale_at(rank) if method is None else method.peer_scale(h.spec, rank))


def client_turn(h: AdapterHandle, method: Method, task, client: SimClient, start: Tensors, cfg: FederationConfig, rnd: int) -> ClientResult:
    """Load the client's start state at its rank, train the round's trainables, score it on its own test shard,
    and split what it holds into upload, eval extras and private state."""
    peer = peer_of(h, client, method)
    h.set({n: t for n, t in start.items() if not is_state(n)}, rank=peer.rank, scale=peer.scale)  # method state stays out
    h.set_trainable(h.trainable_names, True)
    h.set_trainable(method.frozen(h, rnd, peer=peer, start=start), False)  # per round (RoLoRA) and client (Fed-HeLLo)
    probed = method.probe(h, peer, rnd, task, client.train, cfg)
    seed = round_seed(cfg.seed, rnd, client.cid)
    if cfg.lr_schedule != "constant":
        cfg = dataclasses.replace(cfg, lr=round_lr(cfg, rnd), lr_schedule="constant")
    multipliers = method.learning_rates(h, rnd, peer)
    lr_factors = {id(h.parameter(n)): f for n, f in multipliers.items()}
    term = lambda: method.loss_term(h, peer)  # noqa: E731
    correction = method.step_correction(h, peer, rnd, start, cfg.lr, cfg.local_steps)
    lrs = {n: cfg.lr * multipliers.get(n, 1.0) for n in correction}
    after_step = corrected({n: h.parameter(n) for n in correction}, correction, lrs, lambda: method.after_step(h, peer, rnd))

    def steps(n: int) -> float:  # the round's training, n steps, without after_step (Method.before_training)
        return train_local(h.model, task, client.train, dataclasses.replace(cfg, local_steps=n), seed, term, None, lr_factors)

    method.before_training(h, peer, rnd, steps, cfg.local_steps)
    loss = train_local(h.model, task, client.train, cfg, seed, term, after_step, lr_factors)
    method.local_training(h, lambda: train_local(h.model, task, client.train, cfg, seed + 1))
    return finish_turn(h, method, task, client, start, cfg, rnd, peer, loss, probed)


def finish_turn(h: AdapterHandle, method: Method, task, client: SimClient, start: Tensors, cfg: FederationConfig, rnd: int,
                peer: Peer, loss: float, probed: Tensors | None = None) -> ClientResult:
    """The end of a client's turn, its trained state loaded: score it on its own test shard and split what it holds
    into upload (with ``probed``, the method's measurement before training: Fed-HeLLo's Fisher scores), eval extras and
    private state (also after clients trained together, together.py)."""
    with method.local_scoring(h, client.train, cfg.device):
        acc = task.evaluate(h.model, client.test, cfg.device)
    trained = h.get(rank=peer.rank)
    return ClientResult(
        cid=client.cid, upload=method.upload(h, trained, rnd, start, peer=peer) | (probed or {}), extras=method.eval_extras(h, trained),
        private={n: trained[n] for n in method.private(h)} | method.client_state(h, peer, rnd, start, trained),
        n_train=len(client.train), n_test=len(client.test),
        local_accuracy=acc, train_loss=loss,
    )


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


@dataclass
class Simulator:
    """Runs a method over clients on one shared PEFT model. ``run()`` returns one metrics dict per round.

    State: each client's view of the global state (``held``: what it starts its next round from, before its
    ``private`` tensors), the server's ``global_tensors`` and the ``eval_tensors`` it scores, the metrics
    ``history``; the run's byte ledger (``traffic``) and differential privacy (``privacy``)."""

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
    systems: Instant = field(default_factory=Instant)  # who is selected, who finishes, the round's time (systems.py)
    together_ran: bool = field(default=False, init=False)  # whether the last round's clients trained together (together.py; Flower: never)

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("no clients to federate; pass --clients 1 or more")
        h = self.handle
        self.model.to(self.config.device)
        self.peers: list[Peer] = [peer_of(h, c, self.method) for c in self.clients]
        for p in self.peers:
            if not 1 <= p.rank <= h.rank:
                raise ValueError(f"client {p.cid} has rank {p.rank} but the model's adapter has rank {h.rank}; build it at the largest client rank")
        rule = get_rule(self.method.rule) if self.method.rule in RULES else None
        check_server_memory(h, max(1, int(round(self.config.fraction * len(self.clients)))), quadratic=bool(rule and rule.quadratic))
        self.method.schedule(self.config.rounds, len(self.clients))
        self.config, self.privacy = settle_privacy(self.config, self.method, h.spec.kind, [len(c.train) for c in self.clients], self.mixed)
        self.global_tensors: Tensors = h.get()
        self.eval_tensors: Tensors = self.global_tensors
        # Round 1 starts every client from the seeded init at its rank (its first r_u components, as PEFT would
        # initialise it at r_u; the method's ``start``); clients of one rank share one view.
        first = round_seed(self.config.seed, 1)
        self.held: dict[int, Tensors] = {p.cid: self.method.start(h, self.global_tensors, p, first) for p in self.peers}
        self.private: dict[int, Tensors] = {}
        self.history: list[dict] = []
        self.traffic = Traffic({p.cid: p.rank for p in self.peers})
        self.server_opt = ServerOptimizer(self.config.server_opt, self.method)  # refuses a method that declares none
        self.systems.bind(self)

    @property
    def mixed(self) -> bool:
        """Whether the clients have different ranks (the aggregation math then runs in the scaled space)."""
        return any(p.rank != self.handle.rank for p in self.peers)

    @property
    def server(self) -> Peer:
        """The server's own model as the protocol sees it: the largest rank, at its scale."""
        return Peer(-1, self.handle.rank, self.handle.spec.scale_at(self.handle.rank))

    # -- round 0: the method's initialisation round, when it has one -----------------------------------------------
    def setup(self) -> None:
        """Every client sends ``method.setup_upload`` from the initial state; the server's ``setup_aggregate`` is
        applied to every client's view and its own model before round 1 (Fed-SB's federated gradient init)."""
        h, method, cfg = self.handle, self.method, self.config
        results = []
        for client in self.clients:
            peer = self.peers[client.cid]
            h.set(self.held[client.cid], rank=peer.rank, scale=peer.scale)
            try:
                results.append((client.cid, method.setup_upload(h, self.task, client.train, cfg), len(client.train)))
            except Exception as exc:  # as in a round: a failing client is left out, the run goes on
                log.warning("round 0: client %d raised %s: %s; left out of the initialisation", client.cid, type(exc).__name__, exc)
        h.set(self.global_tensors)
        self.close_setup(results)

    def close_setup(self, results: list[tuple[int, Tensors, int]]) -> Tensors:
        """The server half of round 0, shared with the Flower strategy: ``results`` are (cid, upload, n_train).
        Returns the broadcast, already applied here."""
        h, method = self.handle, self.method
        results = self._usable_setup(results)
        weights = client_weights([n for _, _, n in results], self.config.weighting)
        broadcast = method.setup_aggregate(h, [u for _, u, _ in results], weights, self.global_tensors,
                                           peers=[self.peers[cid] for cid, _, _ in results])
        first = round_seed(self.config.seed, 1)
        self.traffic.record_setup([u for _, u, _ in results], [method.deliver(h, broadcast, p, seed=first) for p in self.peers],
                                  [cid for cid, _, _ in results], [p.cid for p in self.peers])
        self._apply(ServerUpdate(broadcast=broadcast), round_seed(self.config.seed, 0), first)
        h.set(self.global_tensors)
        return broadcast

    def _usable_setup(self, results: list[tuple[int, Tensors, int]]) -> list[tuple[int, Tensors, int]]:
        """Round 0's answers without non-finite ones; refused in one line when none is left."""
        name = self.method.name
        if not results:
            raise ValueError(f"no client answered {name}'s initialisation round; check the clients' logs and restart the run")
        bad = [cid for cid, u, _ in results if not all(bool(torch.isfinite(t).all()) for t in u.values())]
        for cid in bad:
            log.warning("round 0: client %d sent non-finite values; left out of the initialisation", cid)
        results = [r for r in results if r[0] not in bad]
        if not results:
            raise ValueError(f"no client sent a usable answer in {name}'s initialisation round; check the clients' data and restart the run")
        return results

    def _setup_due(self) -> bool:
        # Round 0 has run when its bytes wait for round 1's row (or a round has run since).
        return not self.history and self.method.needs_setup() and self.traffic.setup is None

    # -- the round: sample → local training → upload → aggregate → apply → evaluate ------------------------------
    def round(self, rnd: int) -> dict:
        started = time.perf_counter()
        if self._setup_due():
            self.setup()
        results, failed = self._turns(rnd, self.systems.select(rnd))
        return self.close_round(self.systems.finish(rnd, results), failed, rnd, started)[2]

    def _turns(self, rnd: int, selected: list[int]) -> tuple[list[ClientResult], list[Rejection]]:
        """The selected clients' turns, in order; a client that raises is a rejection, not the end of the run. Where
        allowed (``clients_together``) they train in joint passes over the shared base (together.py)."""
        from fedlora.federation.together import run_together

        if (joint := run_together(self, rnd, selected)) is not None:
            return joint
        results, failed = [], []
        for cid in selected:
            try:
                start = self.held[cid] | self.private.get(cid, {})
                results.append(self.turn(self.handle, self.method, self.task, self.clients[cid], start, self.config, rnd))
            except Exception as exc:
                failed.append(Rejection(cid, f"client {cid} raised {type(exc).__name__} during its turn: {exc}"))
            if self.on_client:
                self.on_client(rnd, cid)
        return results, failed

    def close_round(self, results: list[ClientResult], failed: list[Rejection], rnd: int, started: float,
                    secure: SecureSum | None = None):
        """The server half of a round, the one path shared with the Flower strategy: screen, aggregate, apply the
        broadcast to the server's model and every client's view, keep accepted clients' private state, score the
        global model, record the metrics. Returns (update or None when no client is left, accepted, metrics).

        ``secure``: the round ran under secure aggregation, so ``results`` carry each client's scores but no tensors
        and the server holds only the weighted mean of their uploads and extras. A linear rule is applied to that mean
        alone (the same update as on the uploads); nothing per client can be screened or measured (ρ, bound,
        similarity are None); the bytes are the protocol's, recorded in ``traffic`` by whoever ran it."""
        accepted, rejected = self._screen(results, failed, rnd, secure)
        self._arrived(results, failed, rnd)
        update, step, measures = None, None, Measures()
        if accepted or self.privacy.client_level:  # under client-level DP a round nobody joined still releases its noise
            step = self._inputs(accepted, rnd, secure)
            update, measures = self._aggregate(step, rnd)
            self._broadcast(update, accepted, rnd)
        else:
            why = "every upload was rejected (screening, or the client failed)" if results or failed else "no client finished (all offline, dropped or late)"
            log.warning("round %d: %s; round skipped, global model unchanged", rnd, why)
        timed = self.systems.close(rnd, accepted, measures.seconds)  # before the ledger closes: round 0's bytes are still there
        sent = self.traffic.close()
        metrics = self._metrics(rnd, accepted, rejected, step, measures, sent) | timed
        return update, accepted, self._record(metrics, sent, started)

    def _screen(self, results: list[ClientResult], failed: list[Rejection], rnd: int, secure: SecureSum | None):
        """(accepted, rejected): the failed clients and those screening rejects; under secure aggregation SecAgg+'s
        clipping range is the only bound on an upload."""
        if secure is not None:
            accepted, rejected = list(results), list(failed)
        else:
            accepted, screened = screen(self.handle, self.method, results, self.held.__getitem__, self.config.max_norm_ratio, rnd,
                                        self.peers.__getitem__)
            rejected = list(failed) + screened
        for rej in rejected:
            log.warning("round %d: rejected %s", rnd, rej.reason)
        return accepted, rejected

    def _arrived(self, results: list[ClientResult], failed: list[Rejection], rnd: int) -> None:
        """What the round's sampled clients cost, accepted or not: their uploads, the broadcasts they missed and are
        sent now, and under example-level DP the privacy their training spent."""
        sampled = [r.cid for r in results] + [f.cid for f in failed]
        for r in results:
            self.traffic.record_upload(r.cid, r.upload)
        self.traffic.record_sampled(set(sampled), rnd)
        cfg = self.config
        self.privacy.spend(sampled, lambda cid: example_rate(cfg.batch_size, len(self.clients[cid].train)), cfg.local_steps)

    def _inputs(self, accepted: list[ClientResult], rnd: int, secure: SecureSum | None) -> RoundInputs:
        """What the rule is given: the one secure mean, the clipped and noised uploads, or the uploads themselves."""
        peers = [self.peers[r.cid] for r in accepted]
        if secure is not None:
            return secure_inputs(secure, peers)
        if not self.privacy.client_level:
            return plain_inputs(accepted, peers, self.config.weighting)
        cfg = self.config
        template = None if accepted else self.method.upload(self.handle, self.global_tensors, rnd)
        return client_dp_inputs(accepted, [self.held[r.cid] for r in accepted], self.privacy, round_seed(cfg.seed, rnd, -2), template,
                                peers or [self.server])

    def _aggregate(self, step: RoundInputs, rnd: int) -> tuple[ServerUpdate, Measures]:
        cfg = self.config
        seeds = None if step.rounds is None else tuple(round_seed(cfg.seed, rnd if t is None else t) for t in step.rounds)
        ctx = RoundContext(rnd, round_seed(cfg.seed, rnd), step.peers, mixed=self.mixed, seeds=seeds)
        update, measures = aggregate_step(self.handle, self.method, step, self.global_tensors, ctx, bound=cfg.bound, similarity=cfg.similarity)
        # The server optimiser post-processes the method's result (measured above as the method's own).
        return self.systems.server_update(self.server_opt.step(self.handle, update, self.global_tensors, ctx)), measures

    def _broadcast(self, update: ServerUpdate, accepted: list[ClientResult], rnd: int) -> None:
        """Send the round's result to the accepted clients (the others get it when next sampled), apply it here and
        to every client's view, and keep the accepted clients' private state."""
        at_rank = {}
        for peer in self.peers:  # the broadcast's size for each client rank (catch-up later costs the same)
            at_rank.setdefault(peer.rank, peer)
        after = round_seed(self.config.seed, rnd + 1)  # the round the clients train with it
        delivered = {rank: self.method.deliver(self.handle, update.broadcast, p, seed=after) for rank, p in at_rank.items()}
        self.traffic.record_broadcast(rnd, delivered, [r.cid for r in accepted])
        self._apply(update, round_seed(self.config.seed, rnd), after)
        for r in accepted:
            if r.private:
                self.private[r.cid] = r.private

    def _metrics(self, rnd: int, accepted: list[ClientResult], rejected: list[Rejection], step: RoundInputs | None,
                 measures: Measures, sent: RoundBytes) -> dict:
        """The round's metrics line before the global score, in the order metrics.jsonl shows it."""
        metrics = {"round": rnd, "method": self.method.name, "clients": [r.cid for r in accepted]} | local_scores(accepted)
        metrics |= (step.notes if step else {}) | measures.similarity | self.privacy.metrics(rnd) | measures.divergence() | measures.notes
        metrics |= sent.metrics(self.method.communicates) | {"aggregation_seconds": measures.seconds}
        metrics["clients_together"] = self.together_ran  # which path trained the clients (on Flower: each on its SuperNode)
        return metrics | {"rejected": [r.as_dict() for r in rejected], "n_rejected": len(rejected), "skipped": not accepted}

    def _record(self, metrics: dict, sent: RoundBytes, started: float) -> dict:
        """Score the global model, finish the metrics line, keep it and pass it on."""
        global_accuracy, extra = self._score_global()
        metrics = finish_metrics(metrics | extra, global_accuracy, time.perf_counter() - started)
        if sent.rejoin:  # Flower: snapshots sent to clients that lost their state (in bytes_down too)
            metrics["rejoin_bytes"] = sent.rejoin
        self.history.append(metrics)
        if self.on_round:
            self.on_round(metrics)
        return metrics

    def _score_global(self) -> tuple[float, dict]:
        """The global accuracy (for ``local``, the mean of the clients' own models), and the task's extra global
        metrics (the synthetic task's loss against its known floor)."""
        h, cfg, extra = self.handle, self.config, {}
        states = self.method.scored_states(self.held, self.private)
        if states:
            scores = []
            for state in states:
                h.set(state)
                scores.append(self.task.evaluate(self.model, self.global_test, cfg.device))
            accuracy = sum(scores) / len(scores)
        else:
            h.set(self.eval_tensors)
            accuracy = self.task.evaluate(self.model, self.global_test, cfg.device)
            if hasattr(self.task, "global_metrics"):
                extra = self.task.global_metrics(self.model, self.global_test, cfg.device)
        h.set(self.global_tensors)
        return accuracy, extra

    def _apply(self, update: ServerUpdate, seed: int, after: int) -> None:
        """Fold once into the shared base (it serves every client), then move the server's model and every client's
        view (sampled or not: Flower clients catch up on the broadcasts they missed) to the round's state. Clients
        holding the same view at the same rank keep sharing one. ``seed``: this round's; ``after``: the next one's."""
        h, method = self.handle, self.method
        method.fold(h, update.broadcast)
        old = self.global_tensors
        self.global_tensors = method.take(h, update.broadcast, old, self.server, seed)
        self.eval_tensors = update.eval_tensors if update.eval_tensors is not None else self.global_tensors

        def key(view: Tensors, delivered: Tensors, rank: int) -> tuple:
            return id(view), rank, tuple((n, id(t)) for n, t in delivered.items())

        # Clients at the model's rank share the server's view, unless the broadcast carries method state (protocol.STATE:
        # ILoRA's c), which clients keep in their views and the server's model does not.
        carries_state = any(is_state(n) for n in update.broadcast)
        moved = {} if carries_state else {key(old, update.broadcast, h.rank): self.global_tensors}
        views = dict(self.held)  # every old view stays alive (and its id unique) until all are moved
        for p in self.peers:
            delivered = method.deliver(h, update.broadcast, p, seed=after)
            k = key(views[p.cid], delivered, p.rank)
            if k not in moved:
                moved[k] = method.take(h, delivered, views[p.cid], p, seed)
            self.held[p.cid] = moved[k]

    def run(self) -> list[dict]:
        if self.systems.drives:  # asynchronous aggregation: an event loop, not rounds
            return self.systems.run()
        for rnd in range(len(self.history) + 1, self.config.rounds + 1):
            self.round(rnd)
        return self.history

    # -- checkpoints: everything a resumed run needs to continue bit-for-bit ------------------------------------
    def snapshot(self) -> tuple[Tensors, dict]:
        """(tensors, meta) after the last completed round: global and scored trainables, each client's view where
        it is not the global one (mixed ranks), each client's private state, and for methods that fold into the
        base the current base weights of the adapted modules; the server optimiser's state; the byte ledger and the DP accountants."""
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
        tensors |= self.server_opt.state()
        tensors |= {f"method/{k}": t.clone() for k, t in self.method.server_state().items()}  # may share storage with global/
        meta = {"round": self.systems.rounds_done(len(self.history)), "history": self.history} | self.traffic.state() | self.privacy.state()
        extra_tensors, extra_meta = self.systems.state()
        tensors, meta = tensors | extra_tensors, meta | extra_meta
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    @torch.no_grad()
    def restore(self, tensors: Tensors, meta: dict) -> None:
        held = self._restore_tensors(tensors)
        self.server_opt.load({k: t.to(self.config.device) for k, t in tensors.items() if k.startswith("serveropt/")})
        self.method.load_server_state({k.removeprefix("method/"): t for k, t in tensors.items() if k.startswith("method/")})
        self.eval_tensors = dict(self.global_tensors) | self.eval_tensors
        self.held = {p.cid: self.global_tensors | held[p.cid] if p.cid in held else self.global_tensors for p in self.peers}
        self.handle.set(self.global_tensors)
        self.history = list(meta["history"])
        self.traffic.load(meta, len(self.history))
        self.privacy.load(meta)
        self.systems.load(self.history)
        self.systems.restore(tensors, meta)

    def _restore_tensors(self, tensors: Tensors) -> dict[int, Tensors]:
        """Put ``snapshot``'s tensors back (global, eval, private, folded base weights); returns the clients' own views."""
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
        return held

    def global_state(self) -> Tensors:
        """Trainables of the global model as scored (FedSA: Â with the clients' mean B and head)."""
        return dict(self.eval_tensors)
