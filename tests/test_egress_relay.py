"""The relays on loopback: byte-exact bulk transfers on the zero-copy paths (a tunnel spliced
both ways on its connection thread; a plain-HTTP answer spliced one way, a request body sent up
on a second thread) and on the portable fallback; byte counts in the audit; idle bounds and a
server stop end a tunnel.

The origin is a raw TCP server of this test on 127.0.0.1 sending random bytes; the sandbox's
allowlist names its port explicitly, so the CONNECT tunnel carries it as is.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import stat
import threading
import time
from typing import Any, AsyncIterator

import anyio
import pytest

from risoluto.kernel import Kernel
from risoluto.plugins.egress import _relay
from risoluto.plugins.egress._audit import audit_for
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._proxy import Client, EgressProxy
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

SECRET = "relay-" + "q" * 24
AUTH = "Proxy-Authorization: Basic " + base64.b64encode(f"sbx-r:{SECRET}".encode()).decode() + "\r\n"
SIZE = 24 * 1024 * 1024
BLOB = os.urandom(1024 * 1024) * (SIZE // (1024 * 1024))


@contextlib.asynccontextmanager
async def relay_env(tmp_path, stall_after: int | None = None) -> AsyncIterator[tuple[int, int, Kernel, Any]]:
    """(proxy port, origin port, kernel, task group); the origin sends BLOB (or stalls after
    ``stall_after`` bytes, keeping the connection open)."""
    async def serve(stream: Any) -> None:
        async with stream:
            await stream.receive()  # the client speaks first: "go"
            data = BLOB if stall_after is None else BLOB[:stall_after]
            for i in range(0, len(data), 1 << 20):
                await stream.send(data[i:i + (1 << 20)])
            if stall_after is not None:
                await anyio.sleep(30)

    async with proxied_origin(tmp_path, serve, idleTimeoutS=1.5) as env:
        yield env


def make_proxy(tmp_path, origin_port: int, **egress: Any) -> tuple[Kernel, EgressProxy]:
    """A proxy whose one sandbox (127.0.0.1) may reach 127.0.0.1:``origin_port``."""
    settings = build_settings({"egress": {"allowPrivateNetworks": ["127.0.0.0/8"], **egress}}, None,
                              {"DATA_DIR": str(tmp_path)})
    kernel = Kernel(settings)
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                        audit=audit_for(kernel))
    proxy.register(Client(username="sbx-r", secret=SECRET.encode(), sandbox="sbx-r", addresses=frozenset({"127.0.0.1"}),
                          allowlist=Allowlist([f"127.0.0.1:{origin_port}"])))
    return kernel, proxy


@contextlib.asynccontextmanager
async def proxied_origin(tmp_path, serve: Any, **egress: Any) -> AsyncIterator[tuple[int, int, Kernel, Any]]:
    """(proxy port, origin port, kernel, task group): an origin serving each connection with
    ``serve``, and a proxy in front of it."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    origin_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    kernel, proxy = make_proxy(tmp_path, origin_port, **egress)
    async with anyio.create_task_group() as tg:
        async def serve_origin() -> None:
            async with listener:
                await listener.serve(serve)

        tg.start_soon(serve_origin)
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        yield port, origin_port, kernel, tg
        tg.cancel_scope.cancel()


async def open_tunnel(port: int, origin_port: int) -> Any:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n{AUTH}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive()
    assert head.startswith(b"HTTP/1.1 200"), head
    await stream.send(b"go")
    return stream


async def download(port: int, origin_port: int) -> bytes:
    stream = await open_tunnel(port, origin_port)
    got = bytearray()
    async with stream:
        with anyio.fail_after(60), contextlib.suppress(anyio.EndOfStream):
            while True:
                got += await stream.receive(1 << 20)
    return bytes(got)


def last_line(kernel: Kernel) -> Any:
    return audit_for(kernel).recent(lambda d: True, 1)[0]


@pytest.fixture
def spliced(monkeypatch):
    """Bytes moved by splice(2) into a socket (from a pipe), wherever it was called."""
    moved: list[int] = []
    real = os.splice

    def counted(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        n = real(src, dst, count, *args, **kwargs)
        if stat.S_ISSOCK(os.fstat(dst).st_mode):
            moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counted)
    return moved


async def wait_for_allow(kernel: Kernel) -> Any:
    with anyio.fail_after(5):
        while not audit_for(kernel).recent(lambda d: d.verdict == "allow", 1):
            await anyio.sleep(0.01)
    return last_line(kernel)


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
async def test_a_bulk_tunnel_is_byte_exact_through_splice(tmp_path, spliced):
    async with relay_env(tmp_path) as (port, origin_port, kernel, _):
        got = await download(port, origin_port)
        line = await wait_for_allow(kernel)
    assert len(got) == SIZE and hashlib.sha256(got).digest() == hashlib.sha256(BLOB).digest()
    assert sum(spliced) >= SIZE  # every byte went socket -> pipe -> socket, none through Python
    assert (line.verdict, line.reason, line.bytes_down, line.bytes_up) == ("allow", "allowlist", SIZE, 2)


async def test_the_portable_relay_is_byte_exact_too(tmp_path, monkeypatch, spliced):
    monkeypatch.setattr(_relay, "_SPLICE", False)
    async with relay_env(tmp_path) as (port, origin_port, kernel, _):
        got = await download(port, origin_port)
        line = await wait_for_allow(kernel)
    assert hashlib.sha256(got).digest() == hashlib.sha256(BLOB).digest()
    assert spliced == [] and (line.bytes_down, line.bytes_up) == (SIZE, 2)


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
async def test_a_bulk_plain_http_answer_is_spliced_byte_exact(tmp_path, spliced):
    async with relay_env(tmp_path) as (port, origin_port, kernel, _):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        got = bytearray()
        async with stream:
            await stream.send(f"GET http://127.0.0.1:{origin_port}/blob HTTP/1.1\r\n"
                              f"Host: 127.0.0.1:{origin_port}\r\n{AUTH}\r\n".encode())
            with anyio.fail_after(60), contextlib.suppress(anyio.EndOfStream):
                while True:
                    got += await stream.receive(1 << 20)
        line = await wait_for_allow(kernel)
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(BLOB).digest()  # the origin answers raw bytes
    assert sum(spliced) >= SIZE  # the answer went socket -> pipe -> socket
    assert line.bytes_down == SIZE


@contextlib.asynccontextmanager
async def digest_env(tmp_path) -> AsyncIterator[tuple[int, int, Kernel, list[bytes]]]:
    """(proxy port, origin port, kernel, heads seen): the origin reads a request with a body
    (Content-Length or chunked, read to its end as the origin's own parser sees it) and answers
    the sha256 of the body; a request to /early is answered 413 at once, body unread."""
    heads: list[bytes] = []

    async def serve(stream: Any) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, data = data.partition(b"\r\n\r\n")
            heads.append(head)
            if b" /early " in head:
                await stream.send(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            digest = hashlib.sha256()
            if b"chunked" in head.lower():
                while True:
                    while b"\r\n" not in data:
                        data += await stream.receive()
                    size_line, _, data = data.partition(b"\r\n")
                    size = int(size_line, 16)
                    while len(data) < size + 2:
                        data += await stream.receive()
                    digest.update(data[:size])
                    data = data[size + 2:]
                    if size == 0:
                        break
            else:
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(data) < length:
                    data += await stream.receive(1 << 20)
                digest.update(data[:length])
            body = digest.hexdigest().encode()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with proxied_origin(tmp_path, serve, idleTimeoutS=5) as (port, origin_port, kernel, _):
        yield port, origin_port, kernel, heads


async def post(port: int, head: str, body_parts: list[bytes]) -> bytes:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    got = b""
    async with stream:
        await stream.send(head.encode())
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                async def send_body() -> None:
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        for part in body_parts:
                            await stream.send(part)

                tg.start_soon(send_body)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    while True:
                        got += await stream.receive(1 << 20)
                tg.cancel_scope.cancel()
    return got


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_bulk_request_body_goes_up_byte_exact_while_the_answer_comes_down(tmp_path, chunked):
    parts = [BLOB[i:i + (1 << 20)] for i in range(0, SIZE, 1 << 20)]
    async with digest_env(tmp_path) as (port, origin_port, kernel, _):
        head = f"POST http://127.0.0.1:{origin_port}/up HTTP/1.1\r\n{AUTH}"
        if chunked:
            body = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
            head += "Transfer-Encoding: chunked\r\n\r\n"
        else:
            body = parts
            head += f"Content-Length: {SIZE}\r\n\r\n"
        got = await post(port, head, body + [b"GET /smuggled HTTP/1.1\r\n\r\n"])
        line = await wait_for_allow(kernel)
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert got.endswith(hashlib.sha256(BLOB).hexdigest().encode())  # every byte of the body, in order
    assert line.bytes_up == SIZE and line.bytes_down == len(got)  # the body counted; the smuggled tail never sent


async def test_an_answer_before_the_body_ends_the_exchange_promptly(tmp_path):
    async with digest_env(tmp_path) as (port, origin_port, kernel, _):
        started = time.monotonic()
        head = f"POST http://127.0.0.1:{origin_port}/early HTTP/1.1\r\n{AUTH}Content-Length: {SIZE}\r\n\r\n"
        got = await post(port, head, [b"x" * 1024])  # the client then stalls: the body never completes
        await wait_for_allow(kernel)  # audited once its body's thread has ended
    assert got.startswith(b"HTTP/1.1 413")
    assert time.monotonic() - started < 4  # the body's thread was woken, not left to the 5 s idle bound
    assert not [t for t in threading.enumerate() if t.name == "risoluto-egress-body"]


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux only")
async def test_the_idle_bound_ends_a_tunnel(tmp_path, spliced):
    stall = 12 * 1024 * 1024
    async with relay_env(tmp_path, stall_after=stall) as (port, origin_port, kernel, _):
        started = time.monotonic()
        got = await download(port, origin_port)  # ends when the proxy closes the idle tunnel
        elapsed = time.monotonic() - started
        line = await wait_for_allow(kernel)
    assert spliced and len(got) == stall
    assert 1.0 < elapsed < 6  # the 1.5 s idle bound, not the origin's 30 s stall
    assert line.bytes_down == stall


async def test_stopping_the_proxy_ends_a_tunnel_at_once(tmp_path):
    stall = 12 * 1024 * 1024
    async with relay_env(tmp_path, stall_after=stall) as (port, origin_port, kernel, tg):
        stream = await open_tunnel(port, origin_port)
        got = 0
        with anyio.fail_after(20):
            while got < stall:  # the tunnel is relaying; the origin then stalls, keeping it open
                got += len(await stream.receive(1 << 20))
        started = time.monotonic()
        tg.cancel_scope.cancel()  # the server stops
    assert time.monotonic() - started < 1.0  # its sockets were shut down; nothing waited for the idle bound
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        with anyio.fail_after(2):
            while await stream.receive():
                pass
    await stream.aclose()
    assert not [t for t in threading.enumerate() if t.name == "risoluto-egress"]  # serve() joined its threads


async def test_an_origin_that_never_completes_the_handshake_is_a_504(tmp_path):
    """The upstream connect is bounded by egress.connectTimeoutS: a listener whose accept queue is
    full drops our SYN, so the connect never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    origin_port = listener.getsockname()[1]
    held = []
    for _ in range(4):  # fill the accept queue; nobody ever accepts
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", origin_port))
        held.append(s)
    kernel, proxy = make_proxy(tmp_path, origin_port, connectTimeoutS=0.5)
    try:
        async with anyio.create_task_group() as tg:
            _, port = await tg.start(proxy.serve, "127.0.0.1")
            stream = await anyio.connect_tcp("127.0.0.1", port)
            started = time.monotonic()
            async with stream:
                await stream.send(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n{AUTH}\r\n".encode())
                answer = b""
                with anyio.fail_after(5), contextlib.suppress(anyio.EndOfStream):
                    while b"\r\n\r\n" not in answer:
                        answer += await stream.receive()
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
    finally:
        for s in [*held, listener]:
            s.close()
    assert answer.startswith(b"HTTP/1.1 504") and b"connect_timeout" in answer
    assert 0.4 < elapsed < 3
    assert last_line(kernel).reason == "connect_timeout"
