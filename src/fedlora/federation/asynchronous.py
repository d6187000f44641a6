"""Asynchronous aggregation in the in-process simulator: FedAsync and FedBuff (METHODS.md, "Asynchronous aggregation").

An event-driven loop on :class:`~fedlora.federation.clock.EventQueue`. ``C`` clients are in flight
(``--async-concurrency``); a client dispatched at server version ``v`` trains from ``x_v`` (kept in a version store
for every version still in flight) and arrives ``d_u`` simulated seconds later: ``local_steps × speed_u`` without
``--devices`` (``--client-speeds`` in turn), else its device's download + training + upload
(:func:`~fedlora.federation.clock.client_work`): down, the broadcasts of the version steps made since its last
dispatch (what the byte counters charge it, at the method's broadcast size: FLoRA's stack, a folding method's dense
fold), up, the state's bytes. On each arrival the server acts, then an idle client (a seeded random draw) is dispatched
with the current state. Staleness ``τ = v_now − v_u``.

* FedAsync: per tensor ``x ← (1−α_t)x + α_t x_u``, ``α_t = α·h(τ)``; one version per arrival.
* FedBuff: buffer ``h(τ)·(x_u − x_{v_u})``; after K arrivals ``x ← x + (1/K)Σ h(τ)Δ_u`` (then ``--server-opt``);
  one version per flush.

Both run through the synchronous round's server half (:meth:`Simulator.close_round`): the arrivals' uploads are
rewritten to the rule's input (FedAsync: the mixed state; FedBuff: ``x + h(τ)Δ_u``, whose uniform mean is FedBuff's
step; ``Method.async_rewrite``) and the method's own rule averages them, so screening, bytes, the server optimiser,
the broadcast and the metrics line are the synchronous run's. A method declares its trait (``Method.asynchronous``):

* exact: for ffa and fedsb the factors that move meet fixed bases, so the mix of tensors is the mix of ``ΔW``; ravan
  likewise, its effective cores s_i·H_i mixed (its own ``async_rewrite``); flora and florist scale B_u by the weight
  (their clients restart from zero factors; florist then truncates that target at its threshold) and, being folding
  methods (``async_folds``), have their stale clients train on their version's base, the store keeping each
  version's base weights, and FedAsync folds α_t(base_{v_u} − base_now) too; fedex folds its staleness residual
  (``Method.async_extra``).
* inexact: fedit, fedsa, hetlora (data weights), fedrot, feddpa (its global adapter), frlora (folding, as flora)
  and fedhello (per block; not its fim pattern) mix A and B separately (the stale-product error of METHODS.md);
  fslora likewise, in each client's sketch: a method that delivers per round (``Method.async_delivers``) has its
  client start from ``deliver(x_v)`` with the seed of round v_u + 1 (its version's sketch), its upload rewritten
  against x_{v_u} and x cut the same way, and the rule told each upload's round (``RoundContext.seeds``).
* fedbuff (FedBuff only, product-delta form): svd, flexlora, fedmomentum and ilora truncate
  ``BA + (1/K)Σ h(τ)s(B_uA_u − B_{v_u}A_{v_u})`` their own way (``methods.svd.ProductDelta``: the uploads pass as
  sent, ``async_extra`` hands the method each one's start and h(τ) for the flush); FedAsync is refused.

The method state a broadcast carries (``protocol.STATE``: ILoRA's c) is kept for every version in flight and given
to a client dispatched at it, as its view would hold it; a stale client's result carries the round it trained for
(``ClientResult.trained_round``, v_u + 1), so its upload is screened against that round's layout (Fed-HeLLo's blocks).

The server half does not depend on where the events come from: :meth:`Asynchronous.next_client`,
:meth:`~Asynchronous.dispatch` and :meth:`~Asynchronous.receive` (an arrival: the rule, and the version step when it
makes one) are driven here by the simulated clock (``run``: the event queue and in-process training) and on Flower by
the replies as they reach the SuperLink (:mod:`fedlora.flower.asynchronous`, with ``wall`` set: the wall clock).

Our choices (docs/systems.md): arrivals at the same simulated time are handled in client-id order, all of them
before any dispatch (so equal-speed clients restart from the version their arrivals made, and FedBuff with K = C = N
and equal speeds is the synchronous run); a client dispatched again at a version it already started from trains with
another seed; FedBuff averages with 1/K whatever ``--weighting`` says; each server step (every FedAsync arrival, every
FedBuff flush) takes the device profiles' ``[server] seconds``, as a synchronous round's does, and an arrival due while
it runs waits for it; a method's round 0 runs before the first dispatch and takes no simulated time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field

from fedlora.federation.clock import DeviceProfile, EventQueue, client_work, examples_processed, server_step_seconds
from fedlora.federation.screening import Rejection
from fedlora.federation.systems import Instant
from fedlora.federation.traffic import nbytes

log = logging.getLogger("fedlora")

MODES = ("fedasync", "fedbuff")
STALENESS = ("constant", "poly", "hinge")
DEFAULT_SPEEDS = (1.0, 2.0, 4.0)
TRAITS = ("exact", "inexact", "fedbuff")  # the asynchronous traits implemented (Method.asynchronous)


def staleness_weight(kind: str, tau: int, a: float, b: float) -> float:
    """h(τ): constant 1; polynomial (τ+1)^(−a); hinge 1 for τ ≤ b, else 1/(a(τ−b)+1) (the FedAsync paper's, not
    FedLLM-Factory's 1/(a(τ+b)+1), which drops to 1/(a(2b+1)+1) at τ = b+1)."""
    if kind == "constant":
        return 1.0
    if kind == "poly":
        return float((tau + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; choose one of {', '.join(STALENESS)}")


def parse_speeds(text: str, clients: int) -> tuple[float, ...]:
    """``--client-speeds``: time multipliers given to clients in turn (client u takes local_steps × speed_u); empty:
    ``DEFAULT_SPEEDS`` (METHODS.md's 1,2,4; our choice, fewer clients take its first ones)."""
    if not text.strip():
        return tuple(DEFAULT_SPEEDS[u % len(DEFAULT_SPEEDS)] for u in range(clients))
    try:
        cycle = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        cycle = []
    if not cycle or not all(s > 0 and math.isfinite(s) for s in cycle):
        raise ValueError(f"--client-speeds {text!r} is not a list of positive numbers; pass e.g. --client-speeds 1,2,4")
    if len(cycle) > clients:
        raise ValueError(f"--client-speeds {text!r} gives {len(cycle)} speeds to {clients} clients; pass at most {clients} "
                         "(they are given to clients in turn) or raise --clients")
    return tuple(cycle[u % len(cycle)] for u in range(clients))


@dataclass(frozen=True)
class AsyncConfig:
    """The loop's settings, resolved: ``budget`` client updates in all (the synchronous run's rounds × clients per
    round); ``profiles``: each client's device (None: ``speeds``, seconds per local step)."""

    mode: str
    buffer: int
    concurrency: int
    budget: int
    staleness: str = "poly"
    a: float = 0.5
    b: float = 4.0
    alpha: float = 0.6
    rho: float = 0.0
    speeds: tuple[float, ...] = (1.0,)
    profiles: list[DeviceProfile] | None = None
    tokens_per_example: int = 64
    parameters: int = 1
    server_seconds: float | None = 0.0  # each version step's simulated time (None: the measured aggregation_seconds)

    def weight(self, tau: int) -> float:
        return staleness_weight(self.staleness, tau, self.a, self.b)


@dataclass
class Flight:
    cid: int
    version: int  # v_u: the version it started from
    start: float  # simulated time it was dispatched
    salt: int = 0  # earlier dispatches of this client from the same version (its seed differs)
    down: int = 0  # bytes it downloaded when dispatched: the broadcasts since its previous dispatch


@dataclass
class Asynchronous(Instant):
    """The simulator's systems object under ``--async``: it drives the run (``Simulator.run`` hands over to ``run``)."""

    config: AsyncConfig
    drives: bool = True
    queue: EventQueue = field(default_factory=EventQueue)
    version: int = 0
    clock: float = 0.0
    last: float = 0.0  # sim_clock of the last version step
    dispatched: int = 0
    arrived: int = 0
    flights: dict[int, Flight] = field(default_factory=dict)
    store: dict[int, dict] = field(default_factory=dict)  # x_v for every version in flight, and the current one
    bases: dict[int, dict] = field(default_factory=dict)  # folding methods: the base weights of those versions
    sent: dict[int, dict] = field(default_factory=dict)  # the method state (protocol.STATE) each version's broadcast carried
    salts: dict[int, int] = field(default_factory=dict)  # dispatches per client from the current version
    owed: dict[int, int] = field(default_factory=dict)  # per client, the broadcasts' bytes since its last dispatch
    buffer: list = field(default_factory=list)  # FedBuff: (result, v_u, τ)
    failed: list = field(default_factory=list)
    _step: dict = field(default_factory=dict)
    _fold: dict = field(default_factory=dict)  # per module, the d×k weight update this step folds beyond the rule's
    _times: list = field(default_factory=list)  # the clock at each arrival since the last version step
    wall: bool = False  # the clock is a deployment's wall clock (Flower), not simulated: reported as such

    def bind(self, sim) -> None:
        super().bind(sim)
        if self.config.mode == "fedbuff" and sim.config.weighting != "uniform":  # FedBuff's 1/K
            sim.config = dataclasses.replace(sim.config, weighting="uniform")
        if self.config.profiles is not None and len(self.config.profiles) < len(sim.clients):
            raise ValueError(f"{len(self.config.profiles)} device profiles for {len(sim.clients)} clients; give every client one")

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        sim = self.sim
        if sim._setup_due():
            sim.setup()
        self.begin()
        while True:
            self._fill()
            if not self.queue:
                break
            self._arrive(self.queue.pop())
        return sim.history

    def _fill(self) -> None:
        """Dispatch seeded random idle clients while slots are free, the budget allows and no arrival is due now."""
        while not (self.queue and self.queue.peek().time <= self.clock):
            cid = self.next_client()
            if cid is None:
                return
            self.dispatch(cid)
            self.queue.push(self.clock + self.duration(cid), cid, "arrive", tie=cid)  # ties: time, then client id

    # -- the server half, whatever the events come from (this clock, or a Flower deployment's replies) ----------------
    def begin(self) -> None:
        """Before the first dispatch (after a method's round 0): the current version into the store."""
        self._keep(self.version)

    def next_client(self) -> int | None:
        """The client to dispatch next (a seeded random idle one), or None: no slot free, the budget spent, none idle."""
        sim, cfg = self.sim, self.config
        if len(self.flights) >= cfg.concurrency or self.dispatched >= cfg.budget:
            return None
        idle = [c for c in range(len(sim.clients)) if c not in self.flights]
        if not idle:
            return None
        return random.Random(f"{sim.config.seed}/async/{self.dispatched}").choice(idle)

    def dispatch(self, cid: int) -> Flight:
        """Client ``cid`` starts from the current version (kept in the store while it is in flight)."""
        # it downloads the broadcasts it missed before it trains
        flight = self.flights[cid] = Flight(cid, self.version, self.clock, self.salts.get(cid, 0), self.owed.pop(cid, 0))
        self.salts[cid] = self.salts.get(cid, 0) + 1
        self._keep(self.version)
        self.dispatched += 1
        return flight

    def duration(self, cid: int) -> float:
        """Client ``cid``'s time from dispatch to its upload arriving."""
        sim, cfg = self.sim, self.config
        fed = sim.config
        if cfg.profiles is None:
            return fed.local_steps * cfg.speeds[cid]
        profile = cfg.profiles[cid]
        state = nbytes(sim.method.upload(sim.handle, sim.global_tensors, self.version + 1))
        examples = examples_processed(len(sim.clients[cid].train), fed.local_steps, fed.batch_size)
        return client_work(cid, profile, bytes_down=self.flights[cid].down, bytes_up=state, examples=examples,
                           speed=profile.speed(cfg.parameters, cfg.tokens_per_example)).seconds

    def _arrive(self, event) -> None:
        started = time.perf_counter()
        self.clock = max(self.clock, event.time)  # an arrival due during a server step waits for it
        flight = self.flights[event.cid]
        try:
            result = self._train(flight)
        except Exception as exc:  # as in a synchronous round: a client that raises is rejected, the run goes on
            result = Rejection(flight.cid, f"client {flight.cid} raised {type(exc).__name__} during its turn: {exc}")
        self.receive(flight.cid, result, started)

    def receive(self, cid: int, result, started: float):
        """Client ``cid``'s arrival (its ClientResult, or a Rejection: it failed) at ``self.clock``: the rule acts —
        FedAsync at once, FedBuff when K are buffered (or the budget is spent). Returns :meth:`Simulator.close_round`'s
        (update, accepted, metrics) when the arrival made a version step, else None."""
        sim, cfg = self.sim, self.config
        flight = self.flights.pop(cid)
        self.arrived += 1
        tau = self.version - flight.version
        self._times.append(self.clock)
        if isinstance(result, Rejection):
            self.failed.append(result)
            result = None
        elif tau:  # screened against the layout of the round it trained for (a simulated or a Flower client alike)
            result = dataclasses.replace(result, trained_round=flight.version + 1)
        if cfg.mode == "fedasync":
            if result is not None:
                alpha = cfg.alpha * cfg.weight(tau)
                h, (start, current) = sim.handle, self._views(flight.version, cid)
                mixed = sim.method.async_rewrite(h, result.upload, start, current, mode="fedasync", weight=alpha)
                self._fold = sim.method.async_extra(h, "fedasync", [(result.upload, start, alpha)], sim.global_tensors)
                if sim.method.async_folds and tau:  # the base moved since v_u: fold α_t(base_{v_u} − base_now) too
                    now = self._base()
                    for m, b in self.bases[flight.version].items():
                        step = alpha * h.base_layout(m, b - now[m])
                        self._fold[m] = self._fold[m] + step if m in self._fold else step
                return self._close([dataclasses.replace(result, upload=mixed)], [tau], started, alpha=alpha)
            if self.arrived == cfg.budget:
                return self._close([], [], started)
            return None
        if result is not None:
            self.buffer.append((result, flight.version, tau))
        if len(self.buffer) >= cfg.buffer or (self.arrived == cfg.budget and (self.buffer or self.failed)):
            return self._flush(started)
        return None

    def _flush(self, started: float):
        """FedBuff: each buffered upload becomes x + h(τ)(x_u − x_{v_u}); their uniform mean is x + (1/K)Σ h(τ)Δ_u."""
        sim, results, taus = self.sim, [], []
        views = [self._views(v, r.cid) for r, v, _ in self.buffer]
        self._fold = sim.method.async_extra(sim.handle, "fedbuff", [(r.upload, start, self.config.weight(tau))
                                                                    for (r, _, tau), (start, _) in zip(self.buffer, views)], sim.global_tensors)
        for (result, _, tau), (start, current) in zip(self.buffer, views):
            w = self.config.weight(tau)
            if tau == 0 and w == 1.0:  # Δ_u taken from x itself: x + Δ_u is x_u (bit for bit)
                upload = result.upload
            else:
                upload = sim.method.async_rewrite(sim.handle, result.upload, start, current, mode="fedbuff", weight=w)
            results.append(dataclasses.replace(result, upload=upload))
            taus.append(tau)
        self.buffer = []
        return self._close(results, taus, started)

    def _close(self, results: list, taus: list[int], started: float, alpha: float | None = None):
        """One server version step through the synchronous round's server half."""
        self.version += 1
        self.salts = {}
        self._step = {"staleness": taus} | ({} if alpha is None else {"alpha": alpha})
        if self.wall:  # a deployment: the arrivals' wall-clock times (seconds since the loop started), in arrival order
            self._step["arrived_at"] = [round(t, 3) for t in self._times]
        self._times = []
        failed, self.failed = self.failed, []
        return self.sim.close_round(results, failed, self.version, started)

    def _train(self, flight: Flight):
        """Client ``flight.cid``'s local training from x_{v_u} (and its private state), seeded by (v_u + 1, client)."""
        sim, cfg = self.sim, self.config
        version = self._views(flight.version, flight.cid)[0]
        start = version | self.sent.get(flight.version, {}) | sim.private.get(flight.cid, {})
        fed = flight_config(sim.config, flight.salt)
        method = sim.method
        if cfg.rho:
            method.loss_term = proximal_term(method, version, cfg.rho)  # instance attribute: this turn only
        now = None
        if method.async_folds and flight.version != self.version:
            now = {m: w.detach().clone() for m, w in self._base().items()}
        if now is not None:  # a folding method's stale client trains on its version's base
            self._set_base(self.bases[flight.version])
        try:
            result = sim.turn(sim.handle, method, sim.task, sim.clients[flight.cid], start, fed, flight.version + 1)
        finally:
            if cfg.rho:
                del method.loss_term
            if now is not None:
                self._set_base(now)
        if sim.on_client:
            sim.on_client(self.version + 1, flight.cid)
        return result

    def _views(self, version: int, cid: int) -> tuple[dict, dict]:
        """(x_v, x) as client ``cid`` dispatched at ``version`` sees them: the states themselves, or for a method that
        delivers per round (``Method.async_delivers``: FSLoRA) both cut by its ``deliver`` with the seed of the round
        v + 1 the client trains for (its version's sketch), so a rewrite mixes the coordinates it trained."""
        sim = self.sim
        start, current = self.store[version], sim.global_tensors
        if not sim.method.async_delivers:
            return start, current
        from fedlora.federation.simulator import round_seed

        peer, seed = sim.peers[cid], round_seed(sim.config.seed, version + 1)
        return (sim.method.deliver(sim.handle, start, peer, seed=seed), sim.method.deliver(sim.handle, current, peer, seed=seed))

    # -- the version store's base weights (folding methods) -----------------------------------------------------------
    def _keep(self, version: int, replace: bool = False) -> None:
        """Keep x_v (and, for a folding method, its base weights) for ``version``, the current one."""
        if replace or version not in self.store:
            self.store[version] = self.sim.global_tensors
            if self.sim.method.async_folds:
                self.bases[version] = {m: w.detach().clone() for m, w in self._base().items()}

    def _base(self) -> dict:
        h = self.sim.handle
        return {m: layer.get_base_layer().weight for m, layer in h.layers.items()}

    def _set_base(self, weights: dict) -> None:
        for m, w in self._base().items():
            w.data.copy_(weights[m])

    def server_update(self, update):
        """The broadcast's fold gains this step's extra (FedAsync of a folding method: α_t(base_{v_u} − base_now); the
        method's ``async_extra``): sent dense, and counted. The method state the broadcast carries (ILoRA's c) is kept
        for the version it makes: a client dispatched at that version starts from it, as its view would hold it."""
        from fedlora.federation.protocol import FOLD, FOLD_L, FOLD_R, fold_deltas, is_state

        self.sent[self.version] = {n: t for n, t in update.broadcast.items() if is_state(n)}
        if not self._fold:
            return update

        h, broadcast = self.sim.handle, dict(update.broadcast)
        deltas = fold_deltas(broadcast)
        for m, d in self._fold.items():
            extra = d / h.scaling(m)  # h.fold adds s·Δ
            broadcast.pop(f"{m}.{FOLD_L}", None), broadcast.pop(f"{m}.{FOLD_R}", None)
            broadcast[f"{m}.{FOLD}"] = (deltas[m] + extra if m in deltas else extra).to(d.dtype)
        self._fold = {}
        return dataclasses.replace(update, broadcast=broadcast)

    # -- what the round's systems object reports ---------------------------------------------------------------------
    def close(self, rnd: int, accepted: list, server_seconds: float) -> dict:
        """After the server step: keep x_v, drop versions no client in flight needs, charge every client the step's
        broadcast (downloaded at its next dispatch), report the step."""
        self._keep(self.version, replace=True)
        traffic = self.sim.traffic
        for cid in range(len(self.sim.clients)):
            if size := traffic.broadcast_size(self.version, cid):
                self.owed[cid] = self.owed.get(cid, 0) + size
        needed = {f.version for f in self.flights.values()} | {self.version}
        self.store = {v: x for v, x in self.store.items() if v in needed}
        self.bases = {v: x for v, x in self.bases.items() if v in needed}
        self.sent = {v: x for v, x in self.sent.items() if v in needed and x}
        if not self.wall:  # the server step's simulated time, as a synchronous round's (SystemsConfig.server_seconds)
            self.clock += server_step_seconds(self.config.server_seconds, server_seconds)
        seconds, self.last = self.clock - self.last, self.clock
        clock = {"step_seconds": seconds, "clock_seconds": self.clock} if self.wall else {"sim_seconds": seconds, "sim_clock": self.clock}
        return self._step | {"version": self.version, "arrivals": self.arrived, "in_flight": len(self.flights)} | clock

    def rounds_done(self, lines: int) -> int:
        """Synchronous rounds' worth of client updates applied (what a resume is checked against)."""
        per_round = max(1, self.config.budget // max(1, self.sim.config.rounds))
        return self.arrived // per_round

    def state(self) -> tuple[dict, dict]:
        """The version store (all but the current version, which is the global state) and the loop's state."""
        # cloned: versions share tensors with each other and the global state (FFA's A0), which one file cannot hold twice
        tensors = {f"async/{v}/{n}": t.clone() for v, x in self.store.items() if v != self.version for n, t in x.items()}
        tensors |= {f"asyncbase/{v}/{m}": t.clone() for v, x in self.bases.items() if v != self.version for m, t in x.items()}
        tensors |= {f"asyncsent/{v}/{n}": t.clone() for v, x in self.sent.items() for n, t in x.items()}
        meta = {"version": self.version, "clock": self.clock, "last": self.last, "dispatched": self.dispatched,
                "arrived": self.arrived, "queue": self.queue.state(), "salts": {str(c): s for c, s in self.salts.items()},
                "owed": {str(c): n for c, n in self.owed.items()},
                "flights": [[f.cid, f.version, f.start, f.salt, f.down] for f in self.flights.values()]}
        return tensors, {"async": meta}

    def restore(self, tensors: dict, meta: dict) -> None:
        state = meta.get("async")
        if state is None:
            raise ValueError("the checkpoint is not an asynchronous run's; resume it without --async, or start a new --out")
        self.version, self.clock, self.last = int(state["version"]), float(state["clock"]), float(state["last"])
        self.dispatched, self.arrived = int(state["dispatched"]), int(state["arrived"])
        self.queue.load(state["queue"])
        self.salts = {int(c): int(s) for c, s in state["salts"].items()}
        self.owed = {int(c): int(n) for c, n in state.get("owed", {}).items()}  # (none in a checkpoint from before)
        self.flights = {int(f[0]): Flight(int(f[0]), int(f[1]), float(f[2]), int(f[3]), int(f[4]) if len(f) > 4 else 0)
                        for f in state["flights"]}
        device = self.sim.config.device
        self.store, self.bases, self.sent = {}, {}, {}
        self._keep(self.version)
        kept = {"async": self.store, "asyncbase": self.bases, "asyncsent": self.sent}
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind in kept:
                v, _, name = rest.partition("/")
                kept[kind].setdefault(int(v), {})[name] = t.to(device)


def flight_config(fed, salt: int):
    """The run's settings for a client's turn that is its ``salt``-th from the same version: another seed (our choice)."""
    return fed if not salt else dataclasses.replace(fed, seed=fed.seed + 104_729 * salt)


def proximal_term(method, anchor: dict, rho: float):
    """FedAsync's local term (ρ/2)‖x − x_{v_u}‖² over the trained tensors, added to the method's own. An anchor below
    the model's rank (FSLoRA's sketch of k_u components) meets the components the client holds, the first k_u (the
    rest are zero and get no gradient)."""
    own = type(method).loss_term

    def held(h, n, p):
        a = anchor[n]
        return p if p.shape == a.shape else p.narrow(h.rank_dim[n], 0, a.shape[h.rank_dim[n]])

    def term(h, peer):
        extra = own(method, h, peer)
        prox = sum(((held(h, n, p) - anchor[n]) ** 2).sum() for n in h.trainable_names if n in anchor and (p := h.parameter(n)).requires_grad)
        prox = 0.5 * rho * prox
        return prox if extra is None else extra + prox

    return term
