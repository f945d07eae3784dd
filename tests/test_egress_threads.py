"""The egress proxy's connection threads, on loopback: a connection that stalls holds only its
own thread (the pool grows, up to egress.maxConnections + spare), the pool shrinks back once the
burst is over, and stopping the proxy ends every thread, stalled ones included."""

from __future__ import annotations

import base64
import socket
import threading
import time
from typing import Any

import anyio
import pytest

from risoluto.kernel import Kernel
from risoluto.plugins.egress._audit import audit_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._proxy import SPARE_THREADS, Client, EgressProxy
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

SECRET = "threads-" + "t" * 24
AUTH = "Proxy-Authorization: Basic " + base64.b64encode(f"sbx-t:{SECRET}".encode()).decode() + "\r\n"
STALLED = 3 * SPARE_THREADS


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "risoluto-egress"]


def make_proxy(tmp_path: Any, origin_port: int) -> EgressProxy:
    settings = build_settings({"egress": {"allowPrivateNetworks": ["127.0.0.0/8"], "idleTimeoutS": 30}}, None,
                              {"DATA_DIR": str(tmp_path)})
    kernel = Kernel(settings)
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                        audit=audit_for(kernel))
    proxy.register(Client(username="sbx-t", secret=SECRET.encode(), sandbox="sbx-t",
                          addresses=frozenset({"127.0.0.1"}), allowlist=Allowlist([f"127.0.0.1:{origin_port}"])))
    return proxy


def tunnel_echo(port: int, origin_port: int) -> bytes:
    """One CONNECT tunnel to the echo origin (a new connection); what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n{AUTH}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(b"ping")
        return s.recv(4096)


async def test_stalled_connections_hold_only_their_own_threads(tmp_path):
    async def echo(stream: Any) -> None:
        async with stream:
            await stream.send(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    origin_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    proxy = make_proxy(tmp_path, origin_port)
    stalled: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo)
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        try:
            for _ in range(STALLED):  # half a head each, then nothing: each holds a thread (head deadline 10 s)
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
                stalled.append(s)
            with anyio.fail_after(5):
                while proxy._threads.count < STALLED:  # the pool grew past its spare threads
                    await anyio.sleep(0.01)
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(tunnel_echo, port, origin_port) == b"ping"
            assert time.monotonic() - started < 1.0  # served at once, beside the stalled ones
        finally:
            for s in stalled:
                s.close()
        with anyio.fail_after(5):  # the burst is over: the pool shrinks back to its spare threads
            while proxy._threads.count > SPARE_THREADS:
                await anyio.sleep(0.01)
        assert await anyio.to_thread.run_sync(tunnel_echo, port, origin_port) == b"ping"
        tg.cancel_scope.cancel()
    assert proxy_threads() == []


async def test_stopping_ends_threads_stalled_in_a_head(tmp_path):
    proxy = make_proxy(tmp_path, 9)
    stalled: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        _, port = await tg.start(proxy.serve, "127.0.0.1")
        for _ in range(STALLED):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"CONNECT ")
            stalled.append(s)
        with anyio.fail_after(5):
            while proxy._threads.count < STALLED:
                await anyio.sleep(0.01)
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 2.0  # nobody waited for the 10 s head deadline
    assert proxy_threads() == []
    for s in stalled:
        s.settimeout(2)
        assert s.recv(100) == b""  # closed by the proxy
        s.close()
