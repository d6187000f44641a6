"""The Flower strategy: :class:`~fedlora.federation.simulator.Simulator`'s round, with the clients on SuperNodes.

A thin adapter. Sampling is the simulator's seeded :func:`sample_clients` over partition ids; aggregation is
:func:`server_step` (the method object's ``aggregate`` and the same divergence, bound and byte counts); the server
applies each broadcast to its own model with the method's ``apply`` and scores the global model exactly as
``Simulator.round`` does. So a Flower run writes the numbers ``fedlora run`` writes for the same settings and seed.

Hooks as in Flower's message strategies: :meth:`configure_train` says what each sampled client gets,
:meth:`aggregate_train` turns replies into the next global state and the round's metrics. Failed or malformed
replies are logged and left out of the round, never allowed to crash it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedlora.experiment import Experiment
from fedlora.federation.simulator import ClientResult, finish_metrics, round_seed, sample_clients, server_step
from fedlora.flower.records import CONFIG, EXTRAS, METRICS, NODE, UPLOAD, Tensors, broadcast_key, from_record, to_record

NODE_WAIT_SECONDS = 300.0  # how long the server waits for one SuperNode per partition to connect


class FedLoRAStrategy:
    """One fedlora run driven over a Flower :class:`Grid`; ``exp`` is the server's own :func:`build` of the run."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.sim = exp.simulator
        n = len(self.sim.clients)
        self.nodes: dict[int, int] = {}  # partition id → SuperNode id
        self.synced: dict[int, int] = {cid: 0 for cid in range(n)}  # last round whose broadcast each client applied
        self.pending: dict[int, Tensors] = {}  # round → broadcast, kept until every client has applied it

    # -- which SuperNode holds which partition ----------------------------------------------------------------------
    def connect(self, grid: Grid, timeout: float = NODE_WAIT_SECONDS) -> dict[int, int]:
        """Ask every SuperNode its ``partition-id`` until each of the run's partitions has one."""
        n = len(self.sim.clients)
        asked: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            new = [node for node in grid.get_node_ids() if node not in asked]
            if new:
                queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in new]
                for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
                    node = reply.metadata.src_node_id
                    asked.add(node)
                    if reply.has_error():
                        log(WARNING, "SuperNode %s could not say its partition: %s", node, reply.error.reason)
                        continue
                    pid = int(reply.content.config_records[NODE]["partition-id"])
                    if not 0 <= pid < n:
                        log(WARNING, "SuperNode %s holds partition %s, outside this run's %s clients; not used", node, pid, n)
                    elif pid in self.nodes and self.nodes[pid] != node:
                        raise ValueError(
                            f"SuperNodes {self.nodes[pid]} and {node} both hold partition {pid}; give each SuperNode its own "
                            "--node-config 'partition-id=N'"
                        )
                    else:
                        self.nodes[pid] = node
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

    # -- the round ------------------------------------------------------------------------------------------------
    def configure_train(self, rnd: int) -> list[Message]:
        """One train message per sampled client: the round, and every broadcast it has not applied yet."""
        cfg = self.sim.config
        messages = []
        for cid in sample_clients(len(self.sim.clients), cfg.fraction, cfg.seed, rnd):
            rounds = list(range(self.synced[cid] + 1, rnd))
            content = RecordDict({CONFIG: ConfigRecord({"round": rnd, "partition-id": cid, "broadcast-rounds": rounds})})
            for r in rounds:
                content[broadcast_key(r)] = to_record(self.pending[r])
            messages.append(Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id=str(rnd)))
        return messages

    def aggregate_train(self, rnd: int, replies: Iterable[Message], started: float) -> dict | None:
        """``Simulator.round`` after its clients: aggregate, apply to the server's model, score it. None if no reply."""
        sim, h, method, cfg = self.sim, self.sim.handle, self.sim.method, self.sim.config
        results = sorted((r for r in (self._result(m, rnd) for m in replies) if r is not None), key=lambda r: r.cid)
        if not results:
            log(WARNING, "fedlora: round %s got no usable reply; the global model is unchanged", rnd)
            return None
        update, metrics = server_step(h, method, results, sim.global_tensors, cfg, rnd)
        sim.global_tensors = method.apply(h, update.broadcast, sim.global_tensors, seed=round_seed(cfg.seed, rnd))
        sim.eval_tensors = update.eval_tensors if update.eval_tensors is not None else sim.global_tensors
        h.set(sim.eval_tensors)
        global_acc = sim.task.evaluate(sim.model, sim.global_test, cfg.device)
        h.set(sim.global_tensors)

        for r in results:
            self.synced[r.cid] = rnd - 1
        self.pending[rnd] = update.broadcast
        applied_by_all = min(self.synced.values())
        self.pending = {r: b for r, b in self.pending.items() if r > applied_by_all}

        metrics = finish_metrics(metrics, global_acc, time.perf_counter() - started)
        sim.history.append(metrics)
        return metrics

    def _result(self, msg: Message, rnd: int) -> ClientResult | None:
        """A reply as the simulator's ClientResult, or None (logged) when it failed or does not fit the protocol."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "fedlora: round %s: SuperNode %s failed (%s); left out of the round", rnd, node, msg.error.reason)
            return None
        try:
            m = msg.content.metric_records[METRICS]
            cid = int(m["partition-id"])
            if self.nodes.get(cid) != node:
                raise ValueError(f"it says it holds partition {cid}, which the server mapped to SuperNode {self.nodes.get(cid)}")
            device = self.sim.config.device
            upload = from_record(msg.content.array_records[UPLOAD], device)
            extras = from_record(msg.content.array_records[EXTRAS], device)
            self._check(upload, extras)
            return ClientResult(
                cid=cid, upload=upload, extras=extras, private={}, n_train=int(m["n-train"]), n_test=int(m["n-test"]),
                local_accuracy=float(m["local-accuracy"]), train_loss=float(m["train-loss"]),
            )
        except (KeyError, ValueError) as exc:
            log(WARNING, "fedlora: round %s: reply of SuperNode %s left out: %s", rnd, node, exc)
            return None

    def _check(self, upload: Tensors, extras: Tensors) -> None:
        """An upload must hold exactly the tensors the method uploads, in their shapes, all finite."""
        h, method, current = self.sim.handle, self.sim.method, self.sim.global_tensors
        for what, got, want in (("upload", upload, method.upload(h, current)), ("extras", extras, method.eval_extras(h, current))):
            if set(got) != set(want):
                raise ValueError(f"its {what} has tensors {sorted(set(got) ^ set(want))[:3]} where {method.name} expects otherwise")
            for name, t in got.items():
                if t.shape != want[name].shape:
                    raise ValueError(f"its {what} tensor {name} has shape {tuple(t.shape)}, expected {tuple(want[name].shape)}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"its {what} tensor {name} has NaN or infinite values")

