"""Real Redis servers for the tests: the shared one (``RISOLUTO_REDIS_URL``, provisioned by
``scripts/provision-services``) and private throw-away ``redis-server`` processes for the
tests that stop, flush or break a server.

Without a server: under CI (``CI=true``) the tests FAIL; locally as root the provisioning
script is run once; otherwise they skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; CI=true: the Redis tests must run, not skip")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("RISOLUTO_REDIS_URL") or DEFAULT_URL
    script = ROOT / "scripts" / "provision-services"
    if not reachable(url) and os.geteuid() == 0 and script.exists():
        subprocess.run(["bash", str(script)], check=False, timeout=600)
    if not reachable(url):
        unavailable(f"no Redis server answers at {url} (run scripts/provision-services as root)")
    return url


@pytest.fixture
def prefix(redis_url: str):
    """A key prefix of this test's own; its keys are removed afterwards."""
    p = f"risoluto-test:{uuid.uuid4().hex[:12]}:"
    yield p
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{p}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_env(monkeypatch, redis_url: str, prefix: str):
    """The environment the plugin reads, pointed at the shared server and this test's prefix."""
    monkeypatch.setenv("RISOLUTO_REDIS_URL", redis_url)
    monkeypatch.setenv("RISOLUTO_REDIS_PREFIX", prefix)
    return {"url": redis_url, "prefix": prefix}


class PrivateRedis:
    """A redis-server process of the test's own, on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not reachable(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("private redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(redis_url: str):
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed (run scripts/provision-services as root)")
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def anyio_backend():
    return "asyncio"  # Quart and redis.asyncio run on asyncio
