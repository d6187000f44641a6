"""An in-process Flower :class:`Grid`: the ServerApp's round against this process's ClientApp, message by message.

Every message's content crosses a protobuf round trip, as on the wire, so what the server and the clients exchange
is exactly what Flower would carry; ``fresh=True`` also drops the client's process model and round-trips its
context before every message, as deployment's process per message does. Tests use it to check the Flower app's
numbers against the simulator without Flower's runtime; ``benchmarks/bench_secure.py`` uses it to time secure
aggregation.

Why it stays in the library rather than under tests/: it is the check a method's author runs on the Flower path.
A plug-in method (one math file and one protocol file, possibly in the author's own package) is proven to give the
simulator's numbers on Flower's message path with ``run_federation(InlineGrid(config), config)``, in seconds and
without starting a SuperLink (tests/test_plugin.py does exactly that); the benchmarks import it too, and they are
not a test package. It imports only the Flower front end and ``flwr``, so it adds nothing to the layers below.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid

from fedlora.app.experiment import RunConfig
from fedlora.flower import client_app, thin_client
from fedlora.flower.config import to_flower


class InlineGrid(Grid):
    """SuperNodes in this process (module docstring): each message's content crosses a protobuf round trip, as on the wire.

    ``fresh=True`` mimics deployment's process per message: the client's model is dropped and its context goes
    through Flower's serialisation before every message, so only ``context.state`` carries a client's memory.
    ``fail``: (round, partition) pairs whose SuperNode is lost for that round's train message: it never sees it and
    never replies (as a SuperNode killed with kill -9), so the round's wait ends without it.
    ``speeds``: train replies are released in the simulator's event order under ``--async`` (a reply is due
    ``local_steps × speeds[partition]`` simulated seconds after its message was pushed; a pull returns the earliest
    due ones, all of those due at that time, and moves this grid's clock there), so an asynchronous Flower run sees
    the arrivals the simulator's clock makes.
    """

    def __init__(self, config: RunConfig, *, fresh: bool = False, fail: set[tuple[int, int]] = frozenset(),
                 state_dir: Path | None = None, model_worker: str | None = None, speeds: tuple[float, ...] | None = None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.config, self.state_dir, self.model_worker = config, state_dir, model_worker
        self.contexts = {}
        for i in range(config.clients):
            self.start_supernode(500 + i, i)
        self.fresh, self.fail, self.sent = fresh, fail, []
        self.dead: set[int] = set()  # killed SuperNodes the SuperLink still lists
        self.replies: dict[str, Message] = {}
        self.speeds, self.clock, self.due = speeds, 0.0, {}  # due: message id → simulated time its reply arrives

    def start_supernode(self, node: int, partition: int) -> None:
        """A SuperNode for ``partition`` with an empty ``context.state`` (a first start, or a restart: then give it a
        new ``node`` id and :meth:`stop_supernode` the old one), with a state directory of its own if the grid has one."""
        node_config = {"partition-id": partition, "num-partitions": self.config.clients}
        if self.state_dir is not None:
            node_config["state-dir"] = str(Path(self.state_dir) / f"supernode-{partition}")
        if self.model_worker is not None:  # messages go through the thin ClientApp to this model worker
            node_config["model-worker"] = self.model_worker
        self.contexts[node] = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(),
                                      run_config=to_flower(self.config))

    def stop_supernode(self, node: int) -> None:
        del self.contexts[node]

    def kill_supernode(self, node: int) -> None:
        """kill -9 as the SuperLink sees it for its next two heartbeats: still listed, never answering again."""
        self.dead.add(node)

    def set_run(self, run):
        pass

    @property
    def run(self):
        return type("Run", (), {"run_id": 1})()

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Each message is handled at once; its reply waits for :meth:`pull_messages` (a lost SuperNode's: never)."""
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_src_node_id"] = 0
            ids.append(mid)
            reply = self._handle(msg)
            if reply is not None:
                self.replies[mid] = reply
                if self.speeds is not None and msg.metadata.message_type == "train":
                    partition = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                    self.due[mid] = self.clock + self.config.local_steps * self.speeds[partition]
        return ids

    def pull_messages(self, message_ids):
        wanted = [mid for mid in message_ids if mid in self.replies]
        timed = [self.due[mid] for mid in wanted if mid in self.due]
        if timed:  # speeds: only the earliest due replies (all of them, at equal times), and the clock moves there
            self.clock = min(timed)
            wanted = [mid for mid in wanted if self.due.get(mid, self.clock) == self.clock]
        for mid in wanted:
            self.due.pop(mid, None)
        return [self.replies.pop(mid) for mid in wanted]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))

    def _handle(self, msg):
        msg.content = recorddict_from_proto(recorddict_to_proto(msg.content))
        node = msg.metadata.dst_node_id
        if node in self.dead or node not in self.contexts:
            return None
        if msg.metadata.message_type == "train" and (int(msg.metadata.group_id or -1), self.contexts[node].node_config["partition-id"]) in self.fail:
            return None  # lost: no reply at all
        if self.fresh:
            client_app._ProcessModel._loaded = None
            self.contexts[node] = context_from_proto(context_to_proto(self.contexts[node]))
        self.sent.append(msg)
        try:
            app = thin_client.app if self.model_worker is not None else client_app.app
            reply = app(msg, self.contexts[node])
        except Exception as exc:  # what a SuperNode does when its ClientApp raises
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if not reply.has_error():
            reply.content = recorddict_from_proto(recorddict_to_proto(reply.content))
        return reply
