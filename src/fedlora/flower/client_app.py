"""fedlora's Flower ClientApp: one SuperNode is one client (one partition) of ``fedlora run``'s data.

A client's turn is the simulator's own :func:`~fedlora.federation.simulator.client_turn`; before it, the client
applies the broadcasts it has not applied yet with the method's own :meth:`~fedlora.federation.Method.apply`
(fedex/flora fold into the frozen base here, on every client). Nothing here re-implements a method.

In deployment a SuperNode starts a fresh process for every message, so everything a client must remember between
rounds is in ``context.state`` (never in module globals):

- ``fedlora.meta``: the partition id, the last round whose broadcast this client applied, its last round trained;
- ``fedlora.current``: the global trainables it computed from that broadcast (what its next round starts from;
  round 1 starts from the seeded init, so FFA's A0 and FedSA's initial B need no bytes);
- ``fedlora.private``: what the method keeps on the client (FedSA's B and head), from the last round the server
  accepted this client's result in; ``fedlora.private.pending`` holds the latest round's until the next message
  says whether it was accepted (the simulator keeps private state of accepted clients only);
- ``fedlora.base``: the adapted layers' frozen base weights after every fold so far (fedex, flora), stored as the
  weights themselves so a new process reproduces them bit for bit.

The only per-process object is :class:`_ProcessModel`: the run's frozen base model, data and initial adapter as
:func:`~fedlora.app.experiment.build` makes them (seeded, identical in every process), loaded once per process and
reset from ``context.state`` at the start of every message, so no client's state survives in it. In simulation one
process serves many SuperNodes in turn; in deployment it serves one message.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedlora.app.experiment import Experiment, RunConfig, build
from fedlora.app.private_state import STATE_BASE, STATE_CURRENT, STATE_KEYS, STATE_META, STATE_PRIVATE, STATE_RESULT, run_digest
from fedlora.app.rundir import run_settings
from fedlora.federation.asynchronous import flight_config, proximal_term
from fedlora.federation.simulator import client_turn, round_seed
from fedlora.flower.config import from_flower
from fedlora.flower.records import CONFIG, EXTRAS, METRICS, NODE, SNAPSHOT_BASE, SNAPSHOT_CURRENT, UPLOAD, Tensors, broadcast_key, from_record, to_record
from fedlora.flower.secure import reply_arrays
from fedlora.flower.thin_client import _secure_mod

STATE_NONE = -2  # the synced round a client reports when it holds no state of this run
STATE_LOST = "its state was lost"  # in the error a client raises then; the server sends it a snapshot next time
LEGACY_FIT = "fitins.config"  # present in the fit message of a securely aggregated round (Flower's legacy layout)


app = ClientApp(mods=[_secure_mod])  # what the thin ClientApp runs in its own process, and tests in theirs


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this SuperNode holds (so it can sample partitions as the simulator does) and
    the last round whose broadcast this client applied (-2: it holds no state of this run, e.g. after a restart
    without a state directory), so a resumed or restarted server knows what to send it."""
    config = from_flower(context.run_config)
    cid = partition_id(context)
    restore_durable(context, config, cid)
    meta = context.state.config_records.get(STATE_META)
    info = ConfigRecord({"partition-id": cid, "num-partitions": int(context.node_config.get("num-partitions", -1)),
                         "synced-round": int(meta["synced-round"]) if meta is not None else STATE_NONE})
    return Message(RecordDict({NODE: info}), reply_to=msg)


def _catch_up(sim, config, msg: Message, cid: int, current: dict, synced: int) -> tuple[dict, int]:
    """Apply the broadcasts of the rounds after ``synced`` that the message carries, in order: (state, round reached)."""
    h, method, peer = sim.handle, sim.method, sim.peers[cid]
    order = msg.content.config_records[CONFIG]
    for r in (int(x) for x in order["broadcast-rounds"]):
        if r <= synced:  # applied already (the reply that said so was lost): folding twice would corrupt W0
            continue
        if r != synced + 1:
            raise ValueError(f"client {cid} last applied round {synced} but was sent round {r}'s broadcast: {STATE_LOST}")
        broadcast = from_record(msg.content.array_records[broadcast_key(r)], sim.config.device)
        if broadcast:  # empty: no client was accepted in round r, and Simulator.round applies nothing then
            current = method.apply(h, broadcast, current, peer, round_seed(config.seed, r))
        synced = r
    return current, synced


def _settle_result(state, order, meta) -> None:
    """Private state counts only once the server accepted the round that produced it (Simulator.round keeps the
    private tensors of accepted clients only): the last result waits in STATE_RESULT until the server says so."""
    if STATE_RESULT not in state.array_records:
        return
    # asynchronous: the server says whether the last result was accepted (two turns may share a round number)
    accepted = bool(order["last-accepted"]) if "last-accepted" in order else int(meta["result-round"]) == int(order["accepted-round"])
    if accepted:
        state.array_records[STATE_PRIVATE] = state.array_records[STATE_RESULT]
    del state.array_records[STATE_RESULT]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the broadcasts not applied yet, then the simulator's client turn; remember what the method keeps."""
    config = from_flower(context.run_config)
    order = msg.content.config_records[CONFIG]
    cid, rnd = int(order["partition-id"]), int(order["round"])
    if cid != partition_id(context):
        raise ValueError(f"the server addressed partition {cid} to the SuperNode of partition {partition_id(context)}; restart the run")
    proc = _ProcessModel.get(config)
    sim = proc.exp.simulator
    h, method, device = sim.handle, sim.method, sim.config.device
    restore_durable(context, config, cid)
    state = context.state
    if "snapshot-round" in order:  # this client's state was lost: the server sent the state to continue from
        _take_snapshot(state, msg, int(order["snapshot-round"]))

    start = -1 if method.needs_setup() else 0  # a method with a round 0 has not applied even that one yet
    meta = state.config_records[STATE_META] if STATE_META in state.config_records else ConfigRecord({"synced-round": start, "result-round": 0})
    synced = int(meta["synced-round"])
    stored_base = from_record(state.array_records[STATE_BASE], device) if STATE_BASE in state.array_records else {}
    proc.reset(stored_base)
    peer = sim.peers[cid]
    if STATE_CURRENT in state.array_records:
        current = from_record(state.array_records[STATE_CURRENT], device)
    else:  # round 1's start from the initial state (the method's, at this client's rank)
        current = method.start(h, proc.initial, peer, round_seed(config.seed, 1))
    if rnd == 0:  # the method's initialisation round (Fed-SB's gradient estimate): from the initial state, no state kept
        h.set(current, rank=peer.rank, scale=peer.scale)
        upload = method.setup_upload(h, sim.task, sim.clients[cid].train, sim.config)
        metrics = MetricRecord({"partition-id": cid, "n-train": len(sim.clients[cid].train), "n-test": 0,
                                "local-accuracy": float("nan"), "train-loss": float("nan")})
        return Message(RecordDict({UPLOAD: to_record(upload), EXTRAS: to_record({}), METRICS: metrics}), reply_to=msg)
    current, synced = _catch_up(sim, config, msg, cid, current, synced)
    if synced != rnd - 1:
        raise ValueError(f"client {cid} is at round {synced} but was asked to train round {rnd}: {STATE_LOST}")
    _settle_result(state, order, meta)
    private = from_record(state.array_records[STATE_PRIVATE], device) if STATE_PRIVATE in state.array_records else {}
    result = _turn(sim, config, cid, current, private, rnd, int(order.get("seed-salt", 0)))

    state.config_records[STATE_META] = ConfigRecord({"synced-round": synced, "result-round": rnd, "partition-id": cid})
    state.array_records[STATE_CURRENT] = to_record(current)
    if result.private:
        state.array_records[STATE_RESULT] = to_record(result.private)
    if h.folded:
        state.array_records[STATE_BASE] = to_record(proc.base_weights(set(stored_base) | set(h.folded)))
    save_durable(context, config, cid)
    if LEGACY_FIT in msg.content.config_records:  # secure aggregation: a legacy fit reply that secaggplus_mod masks
        weight = result.n_train if config.weighting == "examples" else 1
        upload = method.secure_upload(h, result.upload, current | private, rnd, peer)  # LoRA-A²: dense
        arrays = reply_arrays(upload, result.extras, config.secagg_clip, cid)
        metrics = {"partition-id": cid, "n-train": result.n_train, "n-test": result.n_test,
                   "local-accuracy": float(result.local_accuracy), "train-loss": float(result.train_loss)}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    delay = float(context.node_config.get("reply-delay", 0.0))
    if delay > 0:  # a slow device on purpose (tests, demonstrations of asynchronous aggregation)
        time.sleep(delay)
    reply = RecordDict({
        UPLOAD: to_record(result.upload),
        EXTRAS: to_record(result.extras),
        METRICS: MetricRecord({
            "partition-id": cid, "n-train": result.n_train, "n-test": result.n_test,
            "local-accuracy": float(result.local_accuracy), "train-loss": float(result.train_loss),
        }),
    })
    return Message(reply, reply_to=msg)


def _turn(sim, config: RunConfig, cid: int, current: Tensors, private: Tensors, rnd: int, salt: int):
    """The simulator's client turn from ``current`` and its ``private`` state; asynchronous: the ``salt``-th turn from the same version trains
    with the seed the simulator gives it, and FedAsync's proximal term anchors at the version it starts from."""
    method = sim.method
    rho = config.fedasync_rho if config.async_mode else 0.0  # as the simulator: its --fedasync-rho under either mode
    if rho:  # anchored at x_v, the global state it starts from (its private tensors are not in it)
        method.loss_term = proximal_term(method, current, rho)  # instance attribute: this turn only
    try:
        return client_turn(sim.handle, method, sim.task, sim.clients[cid], current | private, flight_config(sim.config, salt), rnd)
    finally:
        if rho:
            del method.loss_term


def _take_snapshot(state, msg: Message, snapshot_round: int) -> None:
    """Replace the client's state by the snapshot the server sent (its state was lost): the global state after
    ``snapshot_round`` and the folded base weights; no private state, no pending result."""
    for key in (STATE_META, STATE_CURRENT, STATE_PRIVATE, STATE_RESULT, STATE_BASE):
        for records in (state.config_records, state.array_records):
            if key in records:
                del records[key]
    state.config_records[STATE_META] = ConfigRecord({"synced-round": snapshot_round, "result-round": 0})
    state.array_records[STATE_CURRENT] = msg.content.array_records[SNAPSHOT_CURRENT]
    if SNAPSHOT_BASE in msg.content.array_records and len(msg.content.array_records[SNAPSHOT_BASE]):
        state.array_records[STATE_BASE] = msg.content.array_records[SNAPSHOT_BASE]


def state_file(context: Context, config: RunConfig, cid: int) -> Path | None:
    """Where this client's durable state lives: ``<state-dir>/<run>/partition-<cid>.safetensors``, ``<run>`` a digest of
    the run's settings (all but ``rounds``, which a resume may raise), so a resumed run finds its clients' state and
    another run never does. None without a ``state-dir`` in the SuperNode's node config."""
    root = context.node_config.get("state-dir")
    if not root:
        return None
    return Path(str(root)) / run_digest(config) / f"partition-{cid}.safetensors"


def save_durable(context: Context, config: RunConfig, cid: int) -> None:
    """Write the client's state (the ``context.state`` records of this module) to its state file atomically: a kill
    at any moment leaves the previous complete file."""
    path = state_file(context, config, cid)
    if path is None:
        return
    from safetensors.torch import save_file

    state = context.state
    tensors, meta = {}, {}
    for key in STATE_KEYS:
        if key in state.array_records:
            tensors |= {f"{key}/{n}": t.contiguous() for n, t in from_record(state.array_records[key]).items()}
            meta.setdefault("arrays", []).append(key)
        if key in state.config_records:
            meta[key] = dict(state.config_records[key])
    meta["partition-id"] = cid
    meta["config"] = run_settings(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"fedlora": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore_durable(context: Context, config: RunConfig, cid: int) -> None:
    """After a SuperNode restart or a resumed run ``context.state`` is empty: fill it from the state file if any."""
    path = state_file(context, config, cid)
    if path is None or STATE_META in context.state.config_records or not path.exists():
        return
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fedlora"])
    tensors = load_file(str(path))
    for key in STATE_KEYS:
        if key in meta.get("arrays", []):
            prefix = f"{key}/"
            context.state.array_records[key] = to_record({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        if key in meta and isinstance(meta[key], dict):
            context.state.config_records[key] = ConfigRecord(meta[key])


def partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"this SuperNode's node config has partition-id={value!r}; start it with "
            "--node-config 'partition-id=N num-partitions=M' (N from 0 to the run's clients - 1)"
        )
    return value


@dataclass
class _ProcessModel:
    """The run's base model, data and initial adapter in this process, identical in every process (seeded build)."""

    key: str
    exp: Experiment
    pristine: Tensors  # adapted layers' frozen base weights as built, before any fold
    initial: Tensors  # trainables as built: round 1's start

    _loaded = None  # the one per-process slot: a model is only reused for the same run config
    builds = 0  # models built in this process (a model worker builds one per run)

    @classmethod
    def get(cls, config: RunConfig) -> _ProcessModel:
        key = json.dumps({k: v for k, v in config.to_dict().items() if k != "out"}, sort_keys=True)
        if cls._loaded is None or cls._loaded.key != key:
            cls._loaded = None  # drop a previous run's model before loading the next
            exp = build(config)
            cls.builds += 1
            h = exp.simulator.handle
            pristine = {m: layer.get_base_layer().weight.detach().clone() for m, layer in h.layers.items()}
            cls._loaded = cls(key, exp, pristine, h.get())
        return cls._loaded

    @torch.no_grad()
    def reset(self, base: Tensors) -> None:
        """Put this client's frozen base weights in place (another client's folds may be in them) and forget folds."""
        h = self.exp.simulator.handle
        for module, layer in h.layers.items():
            layer.get_base_layer().weight.copy_(base.get(module, self.pristine[module]))
        h.folded.clear()

    def base_weights(self, modules: set[str]) -> Tensors:
        layers = self.exp.simulator.handle.layers
        return {m: layers[m].get_base_layer().weight.detach().clone() for m in sorted(modules)}
