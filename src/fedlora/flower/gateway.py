"""A TLS gateway in front of the SuperLink that lets the SuperNodes' network reach the Fleet API and nothing else.

In flwr 1.41 the SuperLink serves every API on one HTTPS port: the Fleet API (SuperNodes pull and push messages,
each request signed with a registered SuperNode key), the Control API (``flwr supernode register`` and ``flwr run``,
which runs code on every SuperNode) and the runtime API (the ServerApp's). The open-source Control API has no
authentication: anyone who can reach that port and trusts the CA certificate can register a SuperNode key of their
own and start runs. So the SuperLink listens on 127.0.0.1 only, and this gateway is what the SuperNodes' network
sees:

    python -m fedlora.flower.gateway --listen 10.0.0.5:9093 --superlink 127.0.0.1:9092 \\
        --certfile server.pem --keyfile server.key --ca-certfile ca.crt

It terminates TLS with the SuperLink's own certificate (its SAN must name the gateway's address), reads one HTTP/1.1
request per connection, and forwards it to the SuperLink over TLS only when its path is under ``/v1/fleet/`` (or is
``/health``). It forwards exactly the request's ``Content-Length`` body with ``Connection: close``, so a second,
pipelined request on the same connection is never forwarded. Everything else is refused with ``403``, including
``/v1/control/…`` (key registration, ``flwr run``) and ``/v1/runtime/…``, as are chunked request bodies and paths
with ``..``, ``//``, ``%`` or an absolute URL. The operators run ``flwr`` on the SuperLink's host itself (or through
an SSH tunnel to 127.0.0.1). docs/flower.md, "Who may connect", says what this does and does not protect.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 31  # Fleet messages carry model updates; the SuperLink enforces its own limits


def allowed(method: str, target: str) -> str | None:
    """None if the request may pass, else the reason it may not (one line)."""
    if not target.startswith("/"):
        return "only origin-form targets (/path) are forwarded"
    path = target.split("?", 1)[0]
    if ".." in path or "//" in path or "%" in path or "\\" in path:
        return "paths with '..', '//', '%' or '\\' are not forwarded"
    if path in ALLOWED_PATHS or any(path.startswith(p) for p in ALLOWED_PREFIXES):
        return None
    return f"{path} is not part of the Fleet API; the Control and runtime APIs are reachable on the SuperLink's host only"


def _response(status: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class Gateway:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
        self.listen, self.upstream = listen, upstream
        self.server_ctx, self.client_ctx = server_ctx, client_ctx
        self.refused = 0
        self.forwarded = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head[:-4].decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                writer.write(_response("400 Bad Request", "an HTTP/1.x request line is required"))
                return
            method, target, _ = parts
            headers = []
            length = 0
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    writer.write(_response("400 Bad Request", "malformed header line"))
                    return
                key = name.strip().lower()
                if key == "transfer-encoding":
                    writer.write(_response("411 Length Required", "chunked request bodies are not forwarded; send Content-Length"))
                    return
                if key == "content-length":
                    length = int(value.strip())
                    if not 0 <= length <= MAX_BODY:
                        writer.write(_response("413 Content Too Large", "request body too large"))
                        return
                if key in ("connection", "keep-alive", "proxy-connection", "upgrade"):
                    continue
                headers.append(line)
            why = allowed(method, target)
            if why is not None:
                self.refused += 1
                peer = writer.get_extra_info("peername")
                print(f"fedlora gateway: refused {method} {target[:200]} from {peer[0] if peer else '?'}: {why}", file=sys.stderr, flush=True)
                writer.write(_response("403 Forbidden", why))
                return
            body = await reader.readexactly(length) if length else b""
            up_reader, up_writer = await asyncio.open_connection(
                *self.upstream, ssl=self.client_ctx, server_hostname=self.upstream[0], limit=MAX_HEAD)
            try:
                request = "\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode("latin-1")
                up_writer.write(request + body)
                await up_writer.drain()
                self.forwarded += 1
                while chunk := await up_reader.read(1 << 16):
                    writer.write(chunk)
                    await writer.drain()
            finally:
                up_writer.close()
        except (ConnectionError, ssl.SSLError, ValueError, asyncio.IncompleteReadError) as exc:
            print(f"fedlora gateway: a connection ended early ({type(exc).__name__})", file=sys.stderr, flush=True)
        finally:
            try:
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            writer.close()

    async def serve(self) -> None:
        server = await asyncio.start_server(self.handle, *self.listen, ssl=self.server_ctx, limit=MAX_HEAD)
        print(f"fedlora gateway on {self.listen[0]}:{self.listen[1]} → SuperLink {self.upstream[0]}:{self.upstream[1]} "
              "(Fleet API only)", file=sys.stderr, flush=True)
        async with server:
            await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedlora.flower.gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_address, required=True, help="HOST:PORT the SuperNodes connect to")
    p.add_argument("--superlink", type=_address, required=True, help="the SuperLink's HOST:PORT (127.0.0.1:PORT)")
    p.add_argument("--certfile", required=True, help="TLS certificate presented to the SuperNodes (SAN: the --listen host)")
    p.add_argument("--keyfile", required=True)
    p.add_argument("--ca-certfile", required=True, help="CA that signed the SuperLink's certificate")
    args = p.parse_args(argv)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(args.certfile, args.keyfile)
    client_ctx = ssl.create_default_context(cafile=args.ca_certfile)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(Gateway(args.listen, args.superlink, server_ctx, client_ctx).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
