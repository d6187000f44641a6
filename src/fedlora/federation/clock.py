"""The simulated clock: how long a client's round takes on its device, and a small deterministic event queue.

Pure functions of their arguments (no global state, no randomness): the systems model of the round
(:mod:`fedlora.federation.systems`) and, later, asynchronous aggregation build on them.

A client's round is four phases in order (our model; docs/systems.md):

    download  latency + bytes_down / download bandwidth   (the broadcasts it catches up on before training)
    train     examples processed / examples per second
    upload    latency + bytes_up / upload bandwidth
    (broadcast) latency + the round's broadcast / download bandwidth, after the server step, for clients kept

Compute speed is a device's achieved training throughput in FLOP/s; one training token of a model with N parameters
costs ``FLOPS_PER_PARAMETER_TOKEN`` × N FLOPs (our choice: 4, the forward pass's 2N and a backward pass without the
frozen base's weight gradients, 2N), so a client's examples per second is ``flops / (4 · N · tokens per example)``.
A profile may instead give ``examples_per_second`` directly, which then holds for any model.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

FLOPS_PER_PARAMETER_TOKEN = 4.0  # forward 2N + backward through a frozen base (activation gradients only) 2N; our choice


@dataclass(frozen=True)
class DeviceProfile:
    """A named device: achieved training FLOP/s (or a fixed examples/s), bandwidth in bytes/s each way, one-way latency in s."""

    name: str
    flops: float | None  # achieved training FLOP/s (peak × utilisation)
    upload: float  # bytes per second
    download: float  # bytes per second
    latency: float  # seconds, added once per message (download, upload, broadcast)
    examples_per_second: float | None = None  # overrides flops: the same speed for every model

    def __post_init__(self) -> None:
        for what, value in (("upload", self.upload), ("download", self.download)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"device profile {self.name!r}: {what} bandwidth {value} must be a positive number of Mbit/s")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"device profile {self.name!r}: latency {self.latency} must be ≥ 0 ms")
        speed = self.examples_per_second if self.examples_per_second is not None else self.flops
        if speed is None or not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"device profile {self.name!r} needs a positive tflops (or examples-per-second)")

    def speed(self, parameters: int, tokens_per_example: int) -> float:
        """Examples per second for a model of ``parameters`` parameters at ``tokens_per_example`` tokens each."""
        if self.examples_per_second is not None:
            return self.examples_per_second
        return self.flops / (FLOPS_PER_PARAMETER_TOKEN * max(parameters, 1) * max(tokens_per_example, 1))

    def scaled(self, factor: float) -> DeviceProfile:
        """The same device at ``factor`` × its compute speed (a client's draw around its profile)."""
        return DeviceProfile(self.name, None if self.flops is None else self.flops * factor, self.upload, self.download, self.latency,
                             None if self.examples_per_second is None else self.examples_per_second * factor)


def examples_processed(n: int, steps: int, batch_size: int) -> int:
    """Examples a client's ``steps`` local steps touch on a shard of ``n`` (as ``train_local`` batches: seeded passes
    over the shard, the last batch of a pass shorter)."""
    if n <= 0:
        return 0
    total, pos = 0, n
    for _ in range(steps):
        if pos >= n:
            pos = 0
        take = min(batch_size, n - pos)
        total, pos = total + take, pos + take
    return total


@dataclass(frozen=True)
class ClientWork:
    """One client's round on its device: bytes each way, examples trained, and the phases' durations."""

    cid: int
    bytes_down: int
    examples: int
    bytes_up: int
    download_s: float
    train_s: float
    upload_s: float

    @property
    def seconds(self) -> float:
        """From the round's start to the server holding its upload."""
        return self.download_s + self.train_s + self.upload_s

    def done_by(self, t: float) -> tuple[float, int, int]:
        """(seconds active, examples trained, bytes moved) by ``t`` seconds into the round: each phase's share is
        prorated linearly (what a client that stops at ``t`` has spent)."""
        t = min(max(t, 0.0), self.seconds)

        def share(start: float, length: float) -> float:  # the phase's fraction done by t
            if length <= 0:
                return 1.0 if t >= start else 0.0
            return min(max((t - start) / length, 0.0), 1.0)

        down = share(0.0, self.download_s)
        train = share(self.download_s, self.train_s)
        up = share(self.download_s + self.train_s, self.upload_s)
        return t, int(math.floor(train * self.examples)), int(math.floor(down * self.bytes_down + up * self.bytes_up))


def client_work(cid: int, profile: DeviceProfile, *, bytes_down: int, bytes_up: int, examples: int, speed: float) -> ClientWork:
    """The phases of client ``cid``'s round: download (latency + bytes/bandwidth), training (examples/speed), upload."""
    return ClientWork(cid, bytes_down, examples, bytes_up,
                      download_s=profile.latency + bytes_down / profile.download,
                      train_s=examples / speed,
                      upload_s=profile.latency + bytes_up / profile.upload)


def server_step_seconds(configured: float | None, measured: float) -> float:
    """A server step's simulated seconds: the profiles' ``[server] seconds``, or (None, "measured") the step's measured
    aggregation time, which is not reproducible from the seed."""
    return measured if configured is None else configured


def broadcast_seconds(profile: DeviceProfile, nbytes: int) -> float:
    """Sending the round's result to one client."""
    return profile.latency + nbytes / profile.download


@dataclass(frozen=True, order=True)
class Event:
    """Something that happens at ``time`` to client ``cid``; ``seq`` breaks ties in the order events were pushed
    (never by comparing clients)."""

    time: float
    seq: int
    cid: int
    kind: str


class EventQueue:
    """Events in time order, ties in push order: deterministic for the same pushes. ``state``/``load`` for checkpoints."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0

    def push(self, time: float, cid: int, kind: str, tie: int | None = None) -> Event:
        """``tie``: what orders this event among those at the same time (default: push order; asynchronous
        aggregation passes the client id, unique among the events in flight)."""
        event = Event(float(time), self._seq if tie is None else int(tie), int(cid), kind)
        self._seq += 1
        heapq.heappush(self._heap, event)
        return event

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def peek(self) -> Event:
        return self._heap[0]

    def __len__(self) -> int:
        return len(self._heap)

    def state(self) -> dict:
        return {"seq": self._seq, "events": [[e.time, e.seq, e.cid, e.kind] for e in sorted(self._heap)]}

    def load(self, state: dict) -> None:
        self._seq = int(state.get("seq", 0))
        self._heap = [Event(float(t), int(s), int(c), str(k)) for t, s, c, k in state.get("events", [])]
        heapq.heapify(self._heap)
