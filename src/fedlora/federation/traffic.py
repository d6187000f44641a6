"""The bytes a run moves, counted from what is actually sent: one ledger per run, the only place bytes are added up.

Every path that moves tensors records them here as it moves them: the round's uploads, the broadcast each client
receives, round 0 (counted in round 1's row), the broadcasts a client catches up on when it is sampled after missing
rounds, and on Flower the snapshots sent to clients that lost their state and the SecAgg+ protocol's own messages.
:meth:`Traffic.close` hands the round's totals to the metrics line and starts the next round at zero.

What a method *declares* it sends per adapted matrix is its rule's ``comm`` (``register_rule(comm=…)``, read through
:meth:`~fedlora.federation.protocol.Method.declared_elements`); the tests hold these counts to that declaration.
Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

Tensors = dict[str, Tensor]


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def countable(tensors: object) -> bool:
    """A tensor dict (a broken client's reply may be anything: it counts nothing)."""
    return isinstance(tensors, dict) and all(isinstance(t, Tensor) for t in tensors.values())


@dataclass(frozen=True)
class RoundBytes:
    """One round's totals: ``down`` includes ``catch_up`` and ``rejoin``; round 0's bytes are in round 1's."""

    up: int
    down: int
    catch_up: int
    rejoin: int

    def metrics(self, communicates: bool) -> dict[str, int]:
        """The metrics line's byte fields (a reference point that never communicates reports none)."""
        if not communicates:
            return {"bytes_up": 0, "bytes_down": 0, "catch_up_bytes": 0}
        return {"bytes_up": self.up, "bytes_down": self.down, "catch_up_bytes": self.catch_up}


@dataclass
class Traffic:
    """The run's byte ledger. ``ranks``: each client's adapter rank (a broadcast's size depends on it).

    Across rounds it keeps, per client, the last round whose broadcast it has been sent (``sent``), and each recent
    round's broadcast size per rank (``broadcasts``, dropped once every client is past it): a client sampled after
    missing rounds is sent those broadcasts with its train message, and they are counted then."""

    ranks: dict[int, int]
    sent: dict[int, int] = field(default_factory=dict)
    broadcasts: dict[int, dict[int, int]] = field(default_factory=dict)
    setup: tuple[int, int] | None = None  # round 0's (up, down), waiting for round 1's row
    setup_by: dict[int, tuple[int, int]] = field(default_factory=dict)  # round 0's (up, down) per client, for the clock
    _up: int = 0
    _down: int = 0
    _catch_up: int = 0
    _rejoin: int = 0

    def __post_init__(self) -> None:
        self.sent = self.sent or {cid: 0 for cid in self.ranks}

    # -- what moves -------------------------------------------------------------------------------------------------
    def record_setup(self, uploads: list[Tensors], deliveries: list[Tensors], up_cids: list[int] | None = None,
                     down_cids: list[int] | None = None) -> None:
        """Round 0: every client's upload and what each client received (``up_cids``, ``down_cids``: whose, when known)."""
        self.setup = (sum(nbytes(u) for u in uploads), sum(nbytes(d) for d in deliveries))
        by: dict[int, list[int]] = {}
        for cid, u in zip(up_cids or [], uploads):
            by.setdefault(cid, [0, 0])[0] += nbytes(u)
        for cid, d in zip(down_cids or [], deliveries):
            by.setdefault(cid, [0, 0])[1] += nbytes(d)
        self.setup_by = {cid: (up, down) for cid, (up, down) in by.items()}

    def record_upload(self, cid: int, tensors: object) -> None:
        if countable(tensors):
            self._up += nbytes(tensors)

    def record_protocol(self, up: int, down: int) -> None:
        """Bytes of a protocol's own messages, at their serialised size (SecAgg+'s keys, shares, masked vectors)."""
        self._up += up
        self._down += down

    def record_snapshot(self, cid: int, rnd: int, *parts: Tensors) -> None:
        """Client ``cid`` lost its state and is sent the state to continue from with round ``rnd``'s message: the
        broadcasts it missed are in it, not sent again as catch-up."""
        self._rejoin += sum(nbytes(p) for p in parts)
        self.sent[cid] = rnd - 1

    def record_sampled(self, cids: set[int], rnd: int) -> None:
        """Round ``rnd``'s sampled clients are sent every broadcast since the last one they were sent (as on Flower,
        where their train message carries them)."""
        for cid in cids:
            if cid not in self.sent:
                continue
            self._catch_up += self.pending(cid, rnd)
            self.sent[cid] = max(self.sent[cid], rnd - 1)
        oldest = min(self.sent.values(), default=rnd)
        self.broadcasts = {r: b for r, b in self.broadcasts.items() if r > oldest}

    def pending(self, cid: int, rnd: int) -> int:
        """The bytes client ``cid`` is sent with round ``rnd``'s train message: the broadcasts it has missed (nothing recorded)."""
        if cid not in self.sent:
            return 0
        rank = self.ranks[cid]
        return sum(self.broadcasts.get(r, {}).get(rank, 0) for r in range(self.sent[cid] + 1, rnd))

    def broadcast_size(self, rnd: int, cid: int) -> int:
        """Round ``rnd``'s broadcast as client ``cid`` receives it (0 before it is recorded)."""
        return self.broadcasts.get(rnd, {}).get(self.ranks[cid], 0)

    def record_broadcast(self, rnd: int, delivered: dict[int, Tensors], receivers: list[int]) -> None:
        """Round ``rnd``'s broadcast as delivered at each client rank, sent now to ``receivers`` (the others are sent it
        when next sampled, at the same size)."""
        sizes = {rank: nbytes(t) for rank, t in delivered.items()}
        self.broadcasts[rnd] = sizes
        self._down += sum(sizes[self.ranks[cid]] for cid in receivers)
        for cid in receivers:
            self.sent[cid] = rnd

    def close(self) -> RoundBytes:
        """The round's totals (with round 0's, once); the next round starts from zero."""
        setup_up, setup_down = self.setup or (0, 0)
        out = RoundBytes(up=self._up + setup_up, down=self._down + setup_down + self._catch_up + self._rejoin,
                         catch_up=self._catch_up, rejoin=self._rejoin)
        self.setup, self._up, self._down, self._catch_up, self._rejoin = None, 0, 0, 0, 0
        return out

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"sent": self.sent, "broadcast_bytes": self.broadcasts}

    def load(self, meta: dict, rounds: int) -> None:
        """``state()`` as a checkpoint stored it. One from before catch-up was counted: every client as if it had
        been sent every broadcast."""
        self.sent = {int(c): int(r) for c, r in meta.get("sent", {cid: rounds for cid in self.ranks}).items()}
        self.broadcasts = {int(r): {int(k): int(v) for k, v in b.items()} for r, b in meta.get("broadcast_bytes", {}).items()}
