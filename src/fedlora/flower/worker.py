"""A SuperNode's model worker: the frozen base model, tokenizer and data built once, serving every message.

In flwr 1.41 a SuperNode starts a fresh ``flwr-clientapp`` process for every message; fedlora's ClientApp then
imports torch, transformers and PEFT and builds the model and data before it can train (about 6 s of imports here,
plus the model: seconds for MiniLM, minutes for a 7B model). With ``model-worker = "PATH"`` in the SuperNode's node
config, the ClientApp (:mod:`fedlora.flower.thin_client`, which imports none of that) hands each message and the
client's ``context`` to this long-lived process over the Unix socket PATH, and takes back the reply and the new
``context.state``. The worker runs the ClientApp's own handlers (:mod:`fedlora.flower.client_app`) on them, so
nothing about a client's turn changes, and, as there, the model is reset from the message's ``context.state``
first: no client's state survives in the worker between messages, only the model.

    python -m fedlora.flower.worker --socket /run/fedlora/node0.sock &     # beside the SuperNode, same machine
    flower-supernode ... --node-config "partition-id=0 num-partitions=3 model-worker='/run/fedlora/node0.sock'"

One message at a time (a SuperNode handles its messages in turn). Frames: 4-byte big-endian length, then bytes;
a request is a JSON header (``kind``: train, query or stats) and the message's and context's protobufs; a reply
is a JSON header (``error`` when the handler raised, with its one-line text) and the reply content's and the new
context's protobufs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path


def send_frames(conn: socket.socket, *frames: bytes) -> None:
    conn.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))


def recv_frames(conn: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        (size,) = struct.unpack(">I", _recv_exact(conn, 4))
        out.append(_recv_exact(conn, size))
    return out


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


log = logging.getLogger("fedlora.worker")  # debug: each message's start and end times (FEDLORA_WORKER_LOG=debug)

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its terminating NUL (Linux)

class Worker:
    """Serves the ClientApp's handlers on one Unix socket; counts the models it built (``stats``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handled = 0

    def handle(self, kind: str, message: bytes, context: bytes) -> tuple[dict, bytes, bytes]:
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        from fedlora.flower import client_app

        if kind == "stats":
            return {"builds": client_app._ProcessModel.builds, "handled": self.handled, "pid": os.getpid()}, b"", b""
        msg = message_from_proto(ProtoMessage.FromString(message))
        ctx = context_from_proto(ProtoContext.FromString(context))
        handler = {"train": client_app.train, "query": client_app.query}[kind]
        self.handled += 1
        start = time.time()
        try:
            reply = handler(msg, ctx)
        except Exception as exc:  # the ClientApp's error, reported by the thin client as its own
            return {"error": f"{type(exc).__name__}: {exc}"}, b"", context_to_proto(ctx).SerializeToString()
        finally:  # wall-clock times, comparable across the SuperNodes' workers: do their turns overlap?
            log.debug("%s pid %d start %.3f end %.3f (%.3f s)", kind, os.getpid(), start, time.time(), time.time() - start)
        return {}, recorddict_to_proto(reply.content).SerializeToString(), context_to_proto(ctx).SerializeToString()

    def serve(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path {str(self.path)!r} is {len(os.fsencode(self.path))} bytes, over the {MAX_SOCKET_PATH} a Unix "
                             "socket allows; pass a shorter --socket (e.g. under /run or /tmp)")
        if self.path.exists():
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)  # the SuperNode's user only
        server.listen(8)
        print(f"fedlora model worker {os.getpid()} on {self.path}", file=sys.stderr, flush=True)
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    try:
                        header, message, context = recv_frames(conn, 3)
                        out, content, state = self.handle(json.loads(header)["kind"], message, context)
                        send_frames(conn, json.dumps(out).encode(), content, state)
                    except (ConnectionError, OSError) as exc:
                        print(f"fedlora model worker: a request was cut short ({exc})", file=sys.stderr, flush=True)
        finally:
            server.close()
            if self.path.exists():
                self.path.unlink()


class WorkerUnavailable(RuntimeError):
    """No model worker listens on the socket (not started, or it died)."""


def request(path: str | Path, kind: str, message: bytes = b"", context: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes, bytes]:
    """One request to the worker on ``path``; raises :class:`WorkerUnavailable` (one line) when none listens there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except OSError as exc:
        conn.close()
        raise WorkerUnavailable(f"no fedlora model worker answers on {str(path)!r} ({exc.strerror or exc}); start one with "
                           f"`python -m fedlora.flower.worker --socket {path}` or drop model-worker from the node config") from None
    with conn:
        send_frames(conn, json.dumps({"kind": kind}).encode(), message, context)
        header, content, state = recv_frames(conn, 3)
    return json.loads(header), content, state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora.flower.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="Unix socket to listen on (the SuperNode's node config model-worker)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)  # this module's logger only: the libraries keep their own levels
    handler.setFormatter(logging.Formatter("fedlora model worker: %(message)s"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("FEDLORA_WORKER_LOG", "warning").upper())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # finally: the socket file is removed
    try:
        Worker(Path(args.socket)).serve()
    except ValueError as exc:
        print(f"fedlora model worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
