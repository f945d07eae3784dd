"""The request-body deadline (docs/http-security.md, "Slow request bodies").

A request body that has not fully arrived ``server.bodyTimeoutSeconds`` after its headers is
answered 408 ``request_timeout`` and its connection closed; if a response has already started,
the connection is closed. This holds for every route, authenticated or not, the unauthenticated
webhooks included, because it sits in front of the app as ASGI middleware.

Why not Quart's ``BODY_TIMEOUT``: it bounds one ``get_data()`` call from the moment a handler
starts reading. The deadline here is absolute, counted from the request's headers, so a client
that trickles one byte (or one chunk of a chunked body) at a time cannot stretch it.

An HTTP/1 request that declares no body (no ``Content-Length`` above 0, no ``Transfer-Encoding``)
is passed through untouched: the common GET pays nothing. HTTP/2 requests are always watched
(a body needs neither header there).

After a 408 the app hears ``http.disconnect`` (as if the client had left): Quart cancels the
handler, so a half-received body is never processed. hypercorn closes an HTTP/1.1 connection
whose request body did not end once the response is complete, so the slow client is cut off.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

import anyio

from .errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The app's pipeline puts its RequestInfo here (request id, rate-limit headers for the 408).
INFO_KEY = "risoluto.info"
# Set on the scope when the deadline passed, so the app's observers record 408, not 499.
TIMED_OUT_KEY = "risoluto.body_timed_out"

_DISCONNECT: Message = {"type": "http.disconnect"}
_HTTP1 = ("1.1", "1.0")


def declares_body(headers: Any) -> bool:
    for name, value in headers:
        if name == b"content-length":
            if value.strip() not in (b"0", b""):
                return True
        elif name == b"transfer-encoding":
            return True
    return False


class BodyDeadline:
    """ASGI middleware: ``BodyDeadline(app, seconds, new_request_id)``."""

    def __init__(self, app: Any, seconds: float, new_request_id: Callable[[], str]):
        self.app = app
        self.seconds = seconds
        self.new_request_id = new_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP/2 may send a body with neither header (DATA frames until END_STREAM): always watched
        if scope["type"] != "http" or (scope.get("http_version") in _HTTP1
                                       and not declares_body(scope.get("headers", ()))):
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self, scope, receive, send)
        await self.app(scope, exchange.receive, exchange.send)


class _Exchange:
    """One request's receive/send, racing its body against the deadline."""

    __slots__ = ("owner", "scope", "_receive", "_send", "deadline", "body_done", "started", "timed_out")

    def __init__(self, owner: BodyDeadline, scope: Scope, receive: Receive, send: Send):
        self.owner = owner
        self.scope = scope
        self._receive = receive
        self._send = send
        self.deadline = time.monotonic() + owner.seconds
        self.body_done = False
        self.started = False
        self.timed_out = False

    async def receive(self) -> Message:
        if self.timed_out:
            return _DISCONNECT
        if self.body_done:
            return await self._receive()  # only http.disconnect is left to come
        message = None
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            with anyio.move_on_after(remaining):
                message = await self._receive()
        if message is None:
            await self._time_out()
            return _DISCONNECT
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.timed_out:
            return  # the 408 went out instead; the handler is being cancelled
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _time_out(self) -> None:
        self.timed_out = True  # before any await: a concurrent app send is dropped from here on
        self.scope[TIMED_OUT_KEY] = True
        if self.started:
            return  # too late for a 408: ending the exchange makes the server close the connection
        body = self._body()
        headers = [*self._headers(), (b"content-length", str(len(body)).encode())]
        await self._send({"type": "http.response.start", "status": 408, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _body(self) -> bytes:
        seconds = f"{self.owner.seconds:g}"
        return (json.dumps(error_body(
            "request_timeout", f"The request body did not fully arrive within {seconds} s.",
        ), separators=(",", ":")) + "\n").encode()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        info = self.scope.get(INFO_KEY)
        request_id = info.request_id if info is not None else self.owner.new_request_id()
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        if info is not None:
            for name, value in info.rate_headers:
                headers.append((name.lower().encode(), value.encode()))
        if self.scope.get("http_version", "1.1") in ("1.0", "1.1"):
            headers.append((b"connection", b"close"))  # HTTP/2 has no such header
        return headers
