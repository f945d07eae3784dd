"""Helpers for the HTTP security tests: test plugins, a real hypercorn server in a thread,
and a network namespace holding a real non-loopback client.

Traffic stays on this machine: loopback, and a veth pair between the host and a network
namespace the fixture creates (10.231.77.1 host side, 10.231.77.2 inside) and removes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest
from quart import Blueprint, g

from backend_support import lock_store, use_store
from risoluto import hookimpl
from risoluto.app import create_app
from risoluto.settings import build_settings

HOST_IP, NS_IP = "10.231.77.1", "10.231.77.2"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class EchoPlugin:
    """Routes to write and read through: they echo who the guards decided the caller is."""

    @hookimpl
    def risoluto_app_blueprints(self, kernel: Any) -> list[Any]:
        bp = Blueprint("test_echo", __name__)

        async def echo(**_: Any) -> Any:
            info = g.info
            return {"principal": info.principal, "client": info.client, "via_proxy": info.via_proxy}

        bp.add_url_rule("/api/v1/test/echo", "write", echo, methods=list(WRITE_METHODS))
        bp.add_url_rule("/api/v1/test/read", "read", echo, methods=["GET"])
        bp.add_url_rule("/api/v1/test/items/<name>", "item", echo, methods=["GET", *WRITE_METHODS])
        bp.add_url_rule("/plain/echo", "plain", echo, methods=["GET", "POST"])
        return [bp]


class MemorySecrets:
    """A tiny in-memory secret store (stands in for the secrets plugins in these tests)."""

    backend, location = "memory", "memory"

    def __init__(self, values: dict[str, str] | None = None, fail: bool = False):
        self.values = dict(values or {})
        self.fail = fail

    async def get(self, name: str) -> str | None:
        if self.fail:
            raise OSError("disk on fire")
        return self.values.get(name)

    async def list(self) -> list[str]:
        return sorted(self.values)

    async def close(self) -> None:
        pass


class SecretStorePlugin:
    """Puts ``store`` in ``kernel.backends.secrets`` when the app starts (None: locked)."""

    def __init__(self, store: MemorySecrets | None):
        self.store = store

    @hookimpl
    def risoluto_app_services(self, kernel: Any) -> list[Any]:
        plugin = self

        class Install:
            name = "test.secret_store"

            async def start(self) -> None:
                if plugin.store is None:
                    lock_store(kernel)
                else:
                    use_store(kernel, plugin.store)

            async def stop(self) -> None:
                lock_store(kernel, "stopped")

        return [Install()]


def linear_signature(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def linear_body(**extra: Any) -> bytes:
    payload = {"action": "create", "type": "Issue", "data": {"id": os.urandom(6).hex()},
               "webhookTimestamp": int(time.time() * 1000), **extra}
    return json.dumps(payload).encode()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """create_app + hypercorn (configured as ``risoluto serve`` does) on real sockets."""

    def __init__(self, data_dir: str, env: dict[str, str], binds: list[str], plugins: tuple = (),
                 config: dict | None = None):
        environ = {"DATA_DIR": data_dir, **env}
        self.settings = build_settings(config or {}, None, environ)
        self.app = create_app(self.settings, plugins=plugins, environ=environ)
        self.binds = binds
        self.port = free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{b}:{self.port}" for b in self.binds]
        config.accesslog = None
        config.errorlog = None
        config.h11_max_incomplete_size = 64 * 1024

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            try:
                with socket.create_connection((self.binds[0], self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NetNS:
    """A network namespace joined to the host by a veth pair; run clients inside it."""

    def __init__(self, tag: str = "http", host_ip: str = HOST_IP, ns_ip: str = NS_IP) -> None:
        """``tag`` and the /30 of ``host_ip``/``ns_ip`` are this user's own: tests that may run at the
        same time use different ones."""
        suffix = os.getpid() % 100000
        self.prefix = f"rsl-{tag}-"
        self.name = f"{self.prefix}{suffix}"
        self.host_if, self.ns_if = f"r{tag[:2]}h{suffix}", f"r{tag[:2]}n{suffix}"
        self.host_ip, self.ns_ip = host_ip, ns_ip

    def create(self) -> NetNS:
        self._remove_stale()
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        self.exec_ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.exec_ip("link", "set", self.ns_if, "up")
        self.exec_ip("link", "set", "lo", "up")
        return self

    def exec_ip(self, *args: str) -> None:
        _ip("netns", "exec", self.name, "ip", *args)

    def _remove_stale(self) -> None:
        # a crashed earlier run may have left our test address on some interface
        out = _ip("-o", "addr", "show", "to", f"{self.host_ip}/32", check=False).stdout
        for line in out.splitlines():
            _ip("link", "del", line.split()[1].split("@")[0], check=False)
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            if line.startswith(self.prefix):
                _ip("netns", "del", line.split()[0], check=False)

    def remove(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)

    def curl(self, method: str, url: str, headers: list[str] = (), data: bytes | None = None) -> tuple[int, Any]:
        """Send one request from inside the namespace; (status, parsed JSON body or text)."""
        cmd = ["ip", "netns", "exec", self.name, "curl", "-s", "-S", "--path-as-is", "--max-time", "10", "-X", method,
               "-o", "-", "-w", "\n%{http_code}"]
        if method == "HEAD":
            cmd[cmd.index("-X"):cmd.index("-X") + 2] = ["-I"]
        for h in headers:
            cmd += ["-H", h]
        if data is not None:
            cmd += ["--data-binary", "@-"]
        result = subprocess.run(cmd + [url], input=data, capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr.decode()
        text, _, code = result.stdout.decode().rpartition("\n")
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return int(code), body


def netns_available() -> None:
    """Skip when we cannot create namespaces and this is not CI (in CI: fail instead)."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("network namespace tests need root (set CI=true to make this a failure)")


@pytest.fixture(scope="module")
def netns() -> Iterator[NetNS]:
    """A namespace with the default tag and addresses for one test module, removed afterwards."""
    netns_available()
    ns = NetNS().create()
    try:
        yield ns
    finally:
        ns.remove()
