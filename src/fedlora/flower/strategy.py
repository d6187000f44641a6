"""The Flower strategy: :class:`~fedlora.federation.simulator.Simulator`'s round, with the clients on SuperNodes.

A thin adapter. Sampling is the simulator's seeded :func:`round_clients` over partition ids; the server half of
the round is :meth:`Simulator.close_round`, the very code ``Simulator.round`` runs (screening, the method object's
``aggregate``, the same divergence, bound and byte counts, the method's ``fold``/``take`` on the server's own model,
the global score, the metrics line). What each client receives is the method's ``deliver`` for that client (its
own rank and scale under mixed ranks). So a Flower run writes the numbers ``fedlora run`` writes for the same settings and seed.

Hooks as in Flower's message strategies: :meth:`configure_train` says what each sampled client gets,
:meth:`aggregate_train` turns replies into the next global state and the round's metrics. A failed reply, a missing
one or one outside the message layout becomes one of the simulator's rejections (in ``metrics.jsonl``, as for a
client that raised in-process), and uploads go through the simulator's screening: bad replies are data, never the
end of a run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedlora.app.experiment import Experiment
from fedlora.federation.screening import Rejection
from fedlora.federation.simulator import ClientResult, round_clients, round_seed
from fedlora.flower.client_app import STATE_LOST, STATE_NONE
from fedlora.flower.records import (
    CONFIG,
    EXTRAS,
    METRICS,
    NODE,
    SNAPSHOT_BASE,
    SNAPSHOT_CURRENT,
    UPLOAD,
    Tensors,
    broadcast_key,
    from_record,
    to_record,
)

NODE_WAIT_SECONDS = 300.0  # how long the server waits for one SuperNode per partition to connect
QUERY_WAIT_SECONDS = 30.0  # at a round's start, how long a SuperNode that joined since gets to say its partition


class FedLoRAStrategy:
    """One fedlora run driven over a Flower :class:`Grid`; ``exp`` is the server's own :func:`build` of the run."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.sim = exp.simulator
        n = len(self.sim.clients)
        self.nodes: dict[int, int] = {}  # partition id → SuperNode id
        self._asked: set[int] = set()  # SuperNodes that answered the partition query
        self._queries: dict[str, int] = {}  # message id → SuperNode, partition queries not answered yet
        self.standby: dict[int, tuple[int, int]] = {}  # partition → (SuperNode, its synced round): a newcomer waiting
        self.silent: set[int] = set()  # SuperNodes that sent no reply to their last train message
        # Last round whose broadcast each client applied (-1: not even round 0's, for a method that runs one).
        start = -1 if self.sim.method.needs_setup() else 0
        self.synced: dict[int, int] = {cid: start for cid in range(n)}
        self.pending: dict[int, Tensors] = {}  # round → broadcast, kept until every client has applied it
        self.accepted: dict[int, int] = {cid: 0 for cid in range(n)}  # last round each client's result was accepted
        self.sampled: list[int] = []
        self._sent: list[tuple[Message, int]] = []  # the round's train messages and their clients
        self.reported: dict[int, int] = {}  # partition → the synced round its SuperNode reported when it connected
        self.snapshot: set[int] = set()  # clients whose state is gone: their next message carries a snapshot

    # -- which SuperNode holds which partition ----------------------------------------------------------------------
    # Queries are pushed and their replies pulled as they come (never one blocking send_and_receive): a SuperNode
    # the SuperLink still lists but that is gone (it keeps a killed one online for two heartbeats) delays nothing,
    # and its query stays outstanding, answered or dropped later.
    def _ask(self, grid: Grid, nodes: list[int]) -> None:
        """Push a ``partition-id`` query to each of ``nodes``."""
        if not nodes:
            return
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        for mid, node in zip(grid.push_messages(queries), nodes, strict=True):
            if mid:
                self._queries[mid] = node

    def _answers(self, grid: Grid, live: set[int]) -> list[tuple[int, int, int]]:
        """Pull the replies to outstanding queries: (node, partition, synced round) for each usable one."""
        for mid, node in list(self._queries.items()):
            if node not in live:  # it left before answering
                del self._queries[mid]
        if not self._queries:
            return []
        got = []
        for reply in grid.pull_messages(list(self._queries)):
            node = self._queries.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            self._asked.add(node)
            if reply.has_error():
                log(WARNING, "SuperNode %s could not say its partition: %s", node, reply.error.reason)
                continue
            info = reply.content.config_records[NODE]
            pid = int(info["partition-id"])
            if not 0 <= pid < len(self.sim.clients):
                log(WARNING, "SuperNode %s holds partition %s, outside this run's %s clients; not used", node, pid, len(self.sim.clients))
                continue
            got.append((node, pid, int(info.get("synced-round", STATE_NONE))))
        return got

    def _unasked(self, live: set[int]) -> list[int]:
        known = self._asked | set(self._queries.values()) | set(self.nodes.values())
        return sorted(node for node in live if node not in known)

    def connect(self, grid: Grid, timeout: float = NODE_WAIT_SECONDS) -> dict[int, int]:
        """Ask every SuperNode its ``partition-id`` until each of the run's partitions has one."""
        n = len(self.sim.clients)
        deadline = time.monotonic() + timeout
        while True:
            live = set(grid.get_node_ids())
            self._ask(grid, self._unasked(live))
            for node, pid, synced in self._answers(grid, live):
                if pid in self.nodes and self.nodes[pid] != node:
                    raise ValueError(
                        f"SuperNodes {self.nodes[pid]} and {node} both hold partition {pid}; give each SuperNode its own "
                        "--node-config 'partition-id=N'"
                    )
                self.nodes[pid] = node
                self._reconcile(pid, synced)
            if len(self.nodes) == n:
                log(INFO, "fedlora: %s partitions on SuperNodes %s", n, [self.nodes[c] for c in range(n)])
                return self.nodes
            if time.monotonic() > deadline:
                missing = sorted(set(range(n)) - set(self.nodes))
                raise ValueError(
                    f"after {timeout:.0f}s no SuperNode holds partition(s) {missing} of this run's {n} clients; start one "
                    f"SuperNode per partition with --node-config 'partition-id=N num-partitions={n}' "
                    f"(simulation: --federation-config 'num-supernodes={n}')"
                )
            time.sleep(1.0)

    def refresh(self, grid: Grid, wait: float = QUERY_WAIT_SECONDS) -> None:
        """Before a round: a SuperNode that (re)connected since (a restart gets a new node id; a fresh SuperNode has a
        key of its own) takes over its partition, and says which round it holds, so a client whose state is gone gets
        a snapshot. New SuperNodes get up to ``wait`` seconds to answer; a later answer counts at a later round.

        A partition's SuperNode is replaced only if it is gone or sent no reply to its last train message (it may be
        a dead one the SuperLink still lists); a newcomer for a partition whose SuperNode is alive waits on standby."""
        live = set(grid.get_node_ids())
        self._ask(grid, self._unasked(live))
        deadline = time.monotonic() + wait
        while True:
            for node, pid, synced in self._answers(grid, live):
                self.standby[pid] = (node, synced)
            if not self._queries or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        for pid, (node, synced) in sorted(self.standby.items()):
            old = self.nodes.get(pid)
            if node not in live:
                del self.standby[pid]
            elif old is not None and old in live and old not in self.silent:
                log(WARNING, "SuperNode %s also holds partition %s (SuperNode %s, still answering); on standby", node, pid, old)
            else:
                log(INFO, "fedlora: partition %s now on SuperNode %s (was %s)", pid, node, old)
                del self.standby[pid]
                self.nodes[pid] = node
                self._reconcile(pid, synced)

    def _reconcile(self, cid: int, reported: int) -> None:
        """What a (re)connecting client holds against what the server believes: behind, and the broadcasts it needs
        are still pending, it catches up as usual; otherwise it gets a snapshot of the state it should hold."""
        self.reported[cid] = reported
        if reported == STATE_NONE:  # no state of this run: it holds the seeded initial state, before any broadcast
            reported = -1 if self.sim.method.needs_setup() else 0
        if reported >= self.synced[cid]:
            return  # as believed (or ahead: it applied a broadcast whose round the server then lost; it skips it)
        if all(r in self.pending for r in range(reported + 1, self.synced[cid] + 1)):
            self.synced[cid] = reported
        else:
            self.snapshot.add(cid)

    # -- the server's state in its checkpoint ------------------------------------------------------------------------
    def state(self) -> tuple[Tensors, dict]:
        """What the strategy must keep across a ServerApp restart (besides the simulator's checkpoint)."""
        tensors = {f"flower/pending/{r}/{n}": t.detach().cpu().clone().contiguous() for r, b in self.pending.items() for n, t in b.items()}
        meta = {"synced": self.synced, "accepted": self.accepted, "pending": sorted(self.pending), "snapshot": sorted(self.snapshot)}
        return tensors, meta

    def load(self, tensors: Tensors, meta: dict) -> None:
        """The state :meth:`state` saved, from the run's checkpoint (``meta['flower']``)."""
        device = self.sim.config.device
        meta = meta["flower"]
        self.synced = {int(c): int(r) for c, r in meta["synced"].items()}
        self.accepted = {int(c): int(r) for c, r in meta["accepted"].items()}
        self.snapshot = {int(c) for c in meta.get("snapshot", [])}
        self.pending = {int(r): {} for r in meta["pending"]}
        for key, t in tensors.items():
            if key.startswith("flower/pending/"):
                r, _, name = key.removeprefix("flower/pending/").partition("/")
                self.pending[int(r)][name] = t.to(device)

    # -- round 0, for a method that runs one (Fed-SB's gradient init) ------------------------------------------------
    def setup(self, grid: Grid, timeout: float) -> None:
        """Every partition's ``setup_upload``; the server half is :meth:`Simulator.close_setup`, as in-process. Its
        broadcast is pending as round 0's, so each client applies it with round 1's message."""
        if not self.sim.method.needs_setup():
            return
        messages = [
            Message(RecordDict({CONFIG: ConfigRecord({"round": 0, "partition-id": cid, "broadcast-rounds": [], "accepted-round": 0})}),
                    dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id="0")
            for cid in range(len(self.sim.clients))
        ]
        results = []
        for msg in grid.send_and_receive(messages, timeout=timeout):
            got = self._result(msg)
            if isinstance(got, ClientResult):
                results.append((got.cid, got.upload, got.n_train))
            else:
                log(WARNING, "round 0: %s; left out of the initialisation", got.reason)
        results.sort(key=lambda r: r[0])
        self.pending[0] = self.sim.close_setup(results)

    # -- the round ------------------------------------------------------------------------------------------------
    def configure_train(self, rnd: int) -> list[Message]:
        """One train message per sampled client: the round, every broadcast it has not applied yet, and the last
        round whose result the server accepted from it (so it keeps only accepted private state, as the simulator)."""
        self.sampled = round_clients(len(self.sim.clients), self.sim.config, rnd, self.sim.method)
        messages = [self.train_message(cid, rnd) for cid in self.sampled]
        self._sent = list(zip(messages, self.sampled, strict=True))
        return messages

    def train_message(self, cid: int, rnd: int, extra: dict | None = None) -> Message:
        """Client ``cid``'s train message for round ``rnd`` (its broadcasts since it last synced, or a snapshot when
        its state is gone); ``extra``: more entries of its order (asynchronous: the seed salt, the last result's fate)."""
        cfg, h, method = self.sim.config, self.sim.handle, self.sim.method
        if cid in self.snapshot:  # its state is gone: the state it should hold now, instead of the broadcasts
            current = self.sim.held[cid]
            base = {m: layer.get_base_layer().weight.detach() for m, layer in h.layers.items() if m in h.folded}
            order = {"round": rnd, "partition-id": cid, "broadcast-rounds": [], "accepted-round": self.accepted[cid],
                     "snapshot-round": rnd - 1} | (extra or {})
            content = RecordDict({CONFIG: ConfigRecord(order), SNAPSHOT_CURRENT: to_record(current), SNAPSHOT_BASE: to_record(base)})
            self.sim.traffic.record_snapshot(cid, rnd, current, base)  # what it missed is in it: no catch-up
            return Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id=str(rnd))
        rounds = list(range(self.synced[cid] + 1, rnd))
        order = {"round": rnd, "partition-id": cid, "broadcast-rounds": rounds, "accepted-round": self.accepted[cid]} | (extra or {})
        content = RecordDict({CONFIG: ConfigRecord(order)})
        for r in rounds:
            delivered = method.deliver(h, self.pending[r], self.sim.peers[cid], seed=round_seed(cfg.seed, r + 1))
            content[broadcast_key(r)] = to_record(delivered)
        return Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id=str(rnd))

    def aggregate_train(self, rnd: int, replies: Iterable[Message], started: float) -> dict:
        """``Simulator.round`` after its clients' turns: screen and aggregate, apply to the server's model, score it."""
        results, failed, unavailable = [], [], set()
        sent = {m.metadata.message_id: cid for m, cid in self._sent}  # ids were set when the grid pushed them
        for msg in replies:
            cid = sent.get(msg.metadata.reply_to_message_id)
            if cid is not None and msg.has_error() and msg.metadata.src_node_id != self.nodes.get(cid):
                unavailable.add(cid)  # the SuperLink's reply for a SuperNode that stopped its heartbeats: no reply
                continue
            got = self._result(msg, cid)
            (results if isinstance(got, ClientResult) else failed).append(got)
        answered = {r.cid for r in results} | {f.cid for f in failed}
        self.noted_silence(answered)
        failed += [Rejection(cid, f"client {cid} sent no reply in round {rnd}" + (" (its SuperNode is unavailable)" if cid in unavailable else ""))
                   for cid in self.sampled if cid not in answered]
        results.sort(key=lambda r: r.cid)  # the simulator's order: sampled partition ids, ascending
        return self.close(rnd, results, failed, started)

    def noted_silence(self, answered: set[int]) -> None:
        """The round's sampled clients whose SuperNode sent no reply at all (perhaps dead: its partition may be taken over)."""
        for cid in self.sampled:
            node = self.nodes.get(cid)
            if node is not None:
                (self.silent.discard if cid in answered else self.silent.add)(node)

    def close(self, rnd: int, results: list[ClientResult], failed: list[Rejection], started: float, secure=None) -> dict:
        """The server half (:meth:`Simulator.close_round`) and the bookkeeping of who applied which broadcast; with
        ``secure`` (:class:`~fedlora.federation.simulator.SecureSum`) the round was securely aggregated."""
        sim = self.sim
        failed.sort(key=lambda f: f.cid)
        update, accepted, _ = sim.close_round(results, failed, rnd, started, secure)
        for r in accepted:
            self.accepted[r.cid] = rnd

        for r in results:  # every client that trained had applied the broadcasts up to the previous round
            self.synced[r.cid] = rnd - 1
            self.snapshot.discard(r.cid)
        for f in failed:  # its state is gone (a SuperNode restarted without a state directory): a snapshot next time
            if STATE_LOST in f.reason and 0 <= f.cid < len(sim.clients):
                self.snapshot.add(f.cid)
        self.keep_broadcast(rnd, update)
        return sim.history[-1]

    def keep_broadcast(self, rnd: int, update) -> None:
        """Round (or asynchronous version) ``rnd``'s broadcast, pending until every client has applied it."""
        # nothing to apply: an empty broadcast keeps every client's round count in step
        self.pending[rnd] = update.broadcast if update is not None else {}
        applied_by_all = min(self.synced.values())
        self.pending = {r: b for r, b in self.pending.items() if r > applied_by_all}

    def _result(self, msg: Message, cid: int | None = None) -> ClientResult | Rejection:
        """A reply as the simulator's ClientResult, or a Rejection (failed, or not in the protocol's layout); ``cid``:
        the client the message answered was sent to, when known (else its sender's partition).

        The tensors themselves are screened by :func:`server_step`, exactly as in the simulator."""
        node = msg.metadata.src_node_id
        if cid is None:
            cid = next((c for c, n in self.nodes.items() if n == node), -1)
        if msg.has_error():
            return Rejection(cid, f"client {cid} (SuperNode {node}) failed during its turn: {msg.error.reason}")
        try:
            m = msg.content.metric_records[METRICS]
            if int(m["partition-id"]) != cid:
                raise ValueError(f"it says it holds partition {int(m['partition-id'])}")
            device = self.sim.config.device
            return ClientResult(
                cid=cid, upload=from_record(msg.content.array_records[UPLOAD], device),
                extras=from_record(msg.content.array_records[EXTRAS], device), private={},
                n_train=int(m["n-train"]), n_test=int(m["n-test"]),
                local_accuracy=float(m["local-accuracy"]), train_loss=float(m["train-loss"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return Rejection(cid, f"client {cid} (SuperNode {node}) sent a reply outside the protocol: {exc!r}")
