"""The ClientApp Flower starts for every message (``[tool.flwr.app.components] clientapp``): thin, so starting it is cheap.

It imports Flower only. With ``model-worker`` in the SuperNode's node config it hands the message and the client's
``context`` to that SuperNode's model worker (:mod:`fedlora.flower.worker`), which holds the model built once, and
returns the worker's reply with the new ``context.state``; if no worker answers on that socket it says so in the
SuperNode's log and handles the message itself. Without it, it runs the same handlers here
(:mod:`fedlora.flower.client_app`, imported on the first message: torch, transformers, PEFT and the model in this
process, as before). SecAgg+ (``secaggplus_mod``) runs here either way: its keys and masks never leave the SuperNode
process Flower started, and the worker sees only the fit message it wraps.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def _secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a securely aggregated round (they carry its configuration),
    nothing for the others (which it would refuse)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[_secure_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _dispatch("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _dispatch("train", msg, context)


def _dispatch(kind: str, msg: Message, context: Context) -> Message:
    path = context.node_config.get("model-worker")
    if path:
        from fedlora.flower.worker import WorkerUnavailable

        try:
            return forward(str(path), kind, msg, context)
        except WorkerUnavailable as exc:  # the worker died or was never started: slower, but the client still answers
            from logging import WARNING

            from flwr.supercore import log

            log(WARNING, "fedlora: %s; handling this message in the ClientApp process instead", exc)
    from fedlora.flower import client_app

    return getattr(client_app, kind)(msg, context)


def forward(path: str, kind: str, msg: Message, context: Context) -> Message:
    """The message to the model worker on ``path``; its reply, and ``context.state`` replaced by the worker's."""
    from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from fedlora.flower.worker import request

    header, content, state = request(path, kind, message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString())
    if state:
        new = context_from_proto(ProtoContext.FromString(state)).state
        for key in list(context.state.keys()):
            del context.state[key]
        for key, record in new.items():
            context.state[key] = record
    if "error" in header:
        raise RuntimeError(header["error"])
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(content)) if content else RecordDict(), reply_to=msg)
