"""An HTTPS origin for the credential-broker tests: HTTP/1.1 keep-alive (h11), records what it got.

Routes: ``/sse`` streams three server-sent events 0.4 s apart (chunked); ``/big/<n>`` sends n bytes
(Content-Length); ``/chunked`` answers with a chunked body; ``/close`` answers with ``Connection:
close``; ``/idle-close`` answers, then drops the connection 0.2 s later; anything else answers JSON
describing the request (method, target, headers, body). It listens only where the test tells it to.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from typing import Any

import anyio
import h11
from anyio.abc import SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener


class Upstream:
    def __init__(self, redact: bool = False) -> None:
        self.redact = redact
        self.requests: list[dict[str, Any]] = []
        self.connections = 0

    def headers_seen(self, name: str) -> list[str]:
        return [r["headers"].get(name.lower(), "") for r in self.requests]

    async def handle(self, stream: Any) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while True:
                    request, body = await self._read(conn, stream)
                    if request is None:
                        return
                    await self._answer(conn, stream, request, body)
                    if conn.our_state is not h11.DONE:
                        return
                    if request.target == b"/idle-close":  # an origin that drops idle keep-alive connections
                        await anyio.sleep(0.2)
                        return
                    conn.start_next_cycle()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, h11.ProtocolError, OSError):
                return

    async def _read(self, conn: h11.Connection, stream: Any) -> tuple[Any, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""

    async def _answer(self, conn: h11.Connection, stream: Any, request: h11.Request, body: bytes) -> None:
        target = request.target.decode()
        record = {"method": request.method.decode(), "target": target, "body": body.decode("latin-1"),
                  "headers": {k.decode(): v.decode("latin-1") for k, v in request.headers}}
        self.requests.append(record)
        if self.redact:  # a worker must never read a real credential, not even echoed back
            auth = record["headers"].get("authorization")
            record = {**record, "authorization_sha256": hashlib.sha256(auth.encode()).hexdigest() if auth else None,
                      "headers": {k: v for k, v in record["headers"].items() if k != "authorization"}}
        if target == "/sse":
            await stream.send(conn.send(h11.Response(status_code=200, headers=[
                (b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])))
            for i in range(3):
                await stream.send(conn.send(h11.Data(data=f"data: event {i}\n\n".encode())))
                await anyio.sleep(0.4)
            await stream.send(conn.send(h11.EndOfMessage()))
            return
        if target.startswith("/big/"):
            n = int(target.rsplit("/", 1)[1])
            await stream.send(conn.send(h11.Response(status_code=200, headers=[(b"content-length", str(n).encode())])))
            chunk = b"x" * (1024 * 1024)
            while n > 0:
                await stream.send(conn.send(h11.Data(data=chunk[:n])))
                n -= len(chunk)
            await stream.send(conn.send(h11.EndOfMessage()))
            return
        payload = json.dumps(record).encode()
        if target == "/chunked":
            await stream.send(conn.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])))
            for i in range(0, len(payload), 7):
                await stream.send(conn.send(h11.Data(data=payload[i:i + 7])))
        else:
            close = [(b"connection", b"close")] if target == "/close" else []
            await stream.send(conn.send(h11.Response(status_code=200, headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())] + close)))
            await stream.send(conn.send(h11.Data(data=payload)))
        await stream.send(conn.send(h11.EndOfMessage()))


async def start_upstream(tg: TaskGroup, host: str, port: int, tls: ssl.SSLContext) -> tuple[Upstream, int]:
    upstream = Upstream()
    listener: Any = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(SocketAttribute.local_port)
    listener = TLSListener(listener, tls, standard_compatible=False)

    async def serve() -> None:
        async with listener:
            await listener.serve(upstream.handle)

    tg.start_soon(serve)
    return upstream, bound


async def serve_upstream(tg: TaskGroup, sock: Any, tls: ssl.SSLContext, redact: bool = True) -> Upstream:
    """An :class:`Upstream` on an already bound, listening socket (e.g. inside a network namespace)."""
    from anyio.abc import SocketListener

    upstream = Upstream(redact)
    listener: Any = TLSListener(await SocketListener.from_socket(sock), tls, standard_compatible=False)

    async def serve() -> None:
        async with listener:
            await listener.serve(upstream.handle)

    tg.start_soon(serve)
    return upstream
