"""Clients that are slow, absent and late: the object the simulator's round consults about the systems side.

The round asks it three things (:class:`Simulator.round <fedlora.federation.simulator.Simulator>`):

* :meth:`select` — who is asked to train this round (the seeded sample, over-selected by ``--over-select``), and
  which of them are online at the round's start (the others are dropped as ``offline`` and do not train);
* :meth:`finish` — of the clients that trained, whose update reaches the server: each client's round is timed on
  its device (:mod:`fedlora.federation.clock`), clients whose availability window closes (or who drop out) before
  their upload arrives are dropped, and the round closes at the first of: the target number of updates (the
  clients per round before over-selection), the deadline, or the last client's fate being known. A dropped
  client's update is discarded before the server sees anything of it (no bytes, no privacy spent, no state);
* :meth:`close` — the round's simulated time and its record (``sim_seconds``, ``sim_clock``, who was selected,
  finished and dropped and why, the work wasted).

:class:`Instant` is today's federation (every sampled client finishes, instantly) and records nothing; the round
runs the same code with either. Availability is a function of (client, round, simulated time) only, and the clock
is the last round's ``sim_clock``, so a resumed run continues both where it stopped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fedlora.federation.clock import ClientWork, DeviceProfile, EventQueue, broadcast_seconds, client_work, examples_processed, server_step_seconds
from fedlora.federation.traffic import countable, nbytes

DAY = 86_400.0
REASONS = ("offline", "window-closed", "dropout", "deadline", "surplus")


def _draw(seed: int, rnd: int, cid: int, salt: int) -> random.Random:
    """A generator for one (round, client) draw; the same numbers however many clients are drawn before it."""
    return random.Random(f"{seed}/{rnd}/{cid}/{salt}")


# -- availability: who is online when ------------------------------------------------------------------------------
class Available:
    """Every client online all the time (no --availability)."""

    def online(self, cid: int, rnd: int, t: float) -> bool:
        return True

    def stop(self, cid: int, rnd: int, t: float, work: ClientWork) -> tuple[float, str] | None:
        """(seconds into the round, reason) at which client ``cid``, online at ``t``, stops before its upload arrives; None: it does not."""
        return None


@dataclass
class Dropout(Available):
    """``dropout:P``: each selected client drops out of a round with probability ``p``, at a uniformly drawn point of
    its round (seeded by run seed, round and client). Without ``--devices`` a round takes no time, so all its work is lost."""

    p: float
    seed: int

    def stop(self, cid: int, rnd: int, t: float, work: ClientWork) -> tuple[float, str] | None:
        draw = _draw(self.seed, rnd, cid, 1)
        if draw.random() >= self.p:
            return None
        return draw.random() * work.seconds, "dropout"


@dataclass
class Windows(Available):
    """Per-client online windows ``[start, end)`` in simulated seconds, repeating every ``period`` seconds when given.
    Clients without windows are always online."""

    windows: dict[int, list[tuple[float, float]]]
    period: float | None = None

    def _window(self, cid: int, t: float) -> tuple[float, float] | None:
        """The window holding ``t`` (absolute seconds), or None."""
        if cid not in self.windows:
            return (-math.inf, math.inf)
        base = 0.0 if self.period is None else math.floor(t / self.period) * self.period
        for offset in ((0.0,) if self.period is None else (-self.period, 0.0)):  # a window may run past the period's end
            for start, end in self.windows[cid]:
                if base + offset + start <= t < base + offset + end:
                    return base + offset + start, base + offset + end
        return None

    def online(self, cid: int, rnd: int, t: float) -> bool:
        return self._window(cid, t) is not None

    def stop(self, cid: int, rnd: int, t: float, work: ClientWork) -> tuple[float, str] | None:
        window = self._window(cid, t)
        if window is None:
            return 0.0, "offline"
        left = window[1] - t
        return (left, "window-closed") if left < work.seconds else None


def diurnal(clients: int, seed: int, start_hour: float = 22.0, hours: float = 9.0) -> Windows:
    """The charging-at-night pattern: each client is online ``hours`` hours a day from ``start_hour`` in its own time
    zone (drawn uniformly over the day from the seed): screen off, charging and on Wi-Fi overnight. Simulated time 0
    is midnight UTC. Our choice of a simple generator (docs/systems.md)."""
    windows = {}
    for cid in range(clients):
        offset = _draw(seed, 0, cid, 2).random() * DAY
        start = (start_hour * 3600.0 - offset) % DAY
        windows[cid] = [(start, start + hours * 3600.0)]  # may run past midnight: Windows looks one period back
    return Windows(windows, DAY)


# -- the systems side of a round -------------------------------------------------------------------------------------
@dataclass
class SystemsConfig:
    """What the simulated systems side is given. ``profiles``: each client's device (None: no clock, a round takes no
    time); ``server_seconds``: the server step's time per round (None: the measured ``aggregation_seconds``, not
    reproducible); ``tokens_per_example`` and ``parameters``: the model class the profiles' FLOP/s are spent on."""

    profiles: list[DeviceProfile] | None = None
    server_seconds: float | None = 0.0
    availability: Available = field(default_factory=Available)
    deadline: float | None = None
    over_select: float = 1.0
    tokens_per_example: int = 64
    parameters: int = 1


@dataclass(frozen=True)
class Drop:
    cid: int
    reason: str
    seconds: float
    examples: int
    bytes: int

    def as_dict(self) -> dict:
        return {"cid": self.cid, "reason": self.reason, "seconds": self.seconds, "examples": self.examples, "bytes": self.bytes}


class Instant:
    """Today's federation: every sampled client trains and finishes, instantly; nothing is recorded. ``drives``: the
    object runs the whole run itself (asynchronous aggregation, :mod:`fedlora.federation.asynchronous`)."""

    drives = False

    def run(self) -> list[dict]:  # pragma: no cover - only objects that drive override it
        raise NotImplementedError

    def rounds_done(self, lines: int) -> int:
        """Rounds completed, for a checkpoint: one per metrics line."""
        return lines

    def state(self) -> tuple[dict, dict]:
        """(tensors, meta) a checkpoint keeps for this object (none: the clock is the history's)."""
        return {}, {}

    def restore(self, tensors: dict, meta: dict) -> None:
        pass

    def server_update(self, update):
        """The round's server update as the server optimiser left it (asynchronous aggregation may add to its fold)."""
        return update

    def bind(self, sim) -> None:
        self.sim = sim

    def select(self, rnd: int) -> list[int]:
        from fedlora.federation.simulator import round_clients

        return round_clients(len(self.sim.clients), self.sim.config, rnd, self.sim.method)

    def finish(self, rnd: int, results: list) -> list:
        return results

    def close(self, rnd: int, accepted: list, server_seconds: float) -> dict:
        return {}

    def load(self, history: list[dict]) -> None:
        pass


class Systems(Instant):
    """Device profiles, availability, over-selection and a deadline (``SystemsConfig``), consulted by the round."""

    def __init__(self, config: SystemsConfig):
        self.config = config
        self.clock = 0.0  # simulated seconds at the start of the next round
        self._round: dict = {}

    def bind(self, sim) -> None:
        super().bind(sim)
        if self.config.profiles is not None and len(self.config.profiles) < len(sim.clients):
            raise ValueError(f"{len(self.config.profiles)} device profiles for {len(sim.clients)} clients; give every client one")

    def select(self, rnd: int) -> list[int]:
        """The round's sample (the plain run's), or over-selected: the first ceil(F·m) of the same seeded order, a
        superset of the plain sample; clients offline at the round's start are dropped now, untrained."""
        from fedlora.federation.simulator import round_clients, sample_clients

        sim, cfg = self.sim, self.config
        if cfg.over_select > 1:  # (refused under client-level DP, whose Poisson sample stays the plain run's)
            m = max(1, int(round(sim.config.fraction * len(sim.clients))))
            count = min(len(sim.clients), math.ceil(cfg.over_select * m - 1e-9))
            selected = sim.method.participants(rnd, sample_clients(len(sim.clients), sim.config.fraction, sim.config.seed, rnd,
                                                                   count=count), len(sim.clients))
        else:
            selected = round_clients(len(sim.clients), sim.config, rnd, sim.method)
            m = len(selected)
        offline = [cid for cid in selected if not cfg.availability.online(cid, rnd, self.clock)]
        self._round = {"selected": selected, "target": m, "drops": [Drop(cid, "offline", 0.0, 0, 0) for cid in offline],
                       "setup": self._setup_seconds()}
        return [cid for cid in selected if cid not in offline]

    def work(self, result, rnd: int) -> ClientWork:
        """The client's round on its device: the broadcasts it catches up on, its local examples, its upload."""
        sim, cid = self.sim, result.cid
        fed = sim.config
        examples = examples_processed(len(sim.clients[cid].train), fed.local_steps, fed.batch_size)
        up = nbytes(result.upload) if countable(result.upload) else 0
        down = sim.traffic.pending(cid, rnd)
        profile = self._profile(cid)
        if profile is None:  # no clock: the round takes no time
            return ClientWork(cid, down, examples, up, 0.0, 0.0, 0.0)
        return client_work(cid, profile, bytes_down=down, bytes_up=up, examples=examples,
                           speed=profile.speed(self.config.parameters, self.config.tokens_per_example))

    def finish(self, rnd: int, results: list) -> list:
        """The updates that reach the server before the round closes, in the order the clients were sampled."""
        cfg, queue = self.config, EventQueue()
        works = {r.cid: self.work(r, rnd) for r in results}
        for r in results:  # arrivals and stops on one queue; ties in sample order
            stop = cfg.availability.stop(r.cid, rnd, self.clock, works[r.cid])
            if stop is None:
                queue.push(works[r.cid].seconds, r.cid, "arrive")
            else:
                queue.push(stop[0], r.cid, stop[1])
        kept, drops, closed = [], self._round["drops"], 0.0
        while queue:
            event = queue.pop()
            if cfg.deadline is not None and event.time > cfg.deadline:
                closed = cfg.deadline
                drops += [self._drop(works[event.cid], "deadline", closed)] + [self._drop(works[e.cid], "deadline", closed) for e in _drain(queue)]
                break
            closed = event.time
            if event.kind != "arrive":
                drops.append(self._drop(works[event.cid], event.kind, event.time))
                continue
            kept.append(event.cid)
            if len(kept) == self._round["target"]:
                drops += [self._drop(works[e.cid], "surplus", closed) for e in _drain(queue)]
                break
        self._round |= {"closed": closed, "drops": drops, "finished": kept}
        return [r for r in results if r.cid in kept]

    def _drop(self, work: ClientWork, reason: str, at: float) -> Drop:
        seconds, examples, moved = work.done_by(at)
        return Drop(work.cid, reason, seconds, examples, moved)

    def close(self, rnd: int, accepted: list, server_seconds: float) -> dict:
        """The round's record; moves the clock to the round's end (the slowest update kept, or the deadline, then the
        server step, then the broadcast to the clients kept)."""
        server = server_step_seconds(self.config.server_seconds, server_seconds)
        send = [broadcast_seconds(p, self.sim.traffic.broadcast_size(rnd, r.cid)) for r in accepted if (p := self._profile(r.cid))]
        drops = self._round["drops"]
        out = {"selected": self._round["selected"], "finished": self._round["finished"], "dropped": [d.as_dict() for d in drops],
               "n_dropped": len(drops), "wasted_examples": sum(d.examples for d in drops),
               "wasted_seconds": sum(d.seconds for d in drops), "wasted_bytes": sum(d.bytes for d in drops)}
        if self.config.profiles is None:
            return out
        seconds = self._round["setup"] + self._round["closed"] + server + max(send, default=0.0)
        self.clock += seconds
        return out | {"sim_seconds": seconds, "sim_clock": self.clock}

    def _setup_seconds(self) -> float:
        """Round 0 (a method's initialisation exchange with every client), when it ran just before this round."""
        traffic = self.sim.traffic
        if traffic.setup is None or self.config.profiles is None:
            return 0.0
        return max((2 * p.latency + up / p.upload + down / p.download
                    for cid, (up, down) in traffic.setup_by.items() if (p := self._profile(cid))), default=0.0)

    def _profile(self, cid: int) -> DeviceProfile | None:
        return None if self.config.profiles is None else self.config.profiles[cid]

    def load(self, history: list[dict]) -> None:
        """A resumed run: the clock where the last completed round left it."""
        self.clock = float(history[-1].get("sim_clock", 0.0)) if history else 0.0


def _drain(queue: EventQueue) -> list:
    out = []
    while queue:
        out.append(queue.pop())
    return out
