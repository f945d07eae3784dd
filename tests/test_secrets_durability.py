"""Crash safety and concurrency through real processes: kill -9 mid-writes, a real hypercorn server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from http_support import free_port
from serve_util import spawn, stop, wait_answering
from secrets_util import stored_values

from risoluto.plugins.secrets.file_store import FileStore
from risoluto.plugins.secrets.sqlite_store import SqliteStore

pytestmark = pytest.mark.anyio

KEY = "durability key"
BACKENDS = ["file", "sqlite"]
RISOLUTO = str(Path(sys.executable).parent / "risoluto")

# Four concurrent writers; a name is printed only after set() returned (acknowledged).
WRITER = """
import sys, anyio
from risoluto.kernel import Kernel
from risoluto.settings import load_settings
from risoluto.secret_store import open_store

async def main():
    settings = load_settings()
    opened = await open_store(settings, Kernel(settings).hooks)
    store = opened.store
    run = sys.argv[1]

    async def writer(w):
        for i in range(1_000_000):
            name = f"R{run}_W{w}_{i:06}"
            await store.set(name, "value-" + name)
            print(name, flush=True)

    async with anyio.create_task_group() as tg:
        for w in range(4):
            tg.start_soon(writer, w)

anyio.run(main)
"""


def env_for(data_dir: Path, backend: str, **extra: str) -> dict[str, str]:
    config = data_dir.parent / f"config-{backend}.yaml"
    config.write_text(f"secrets:\n  backend: {backend}\nrateLimit:\n  api:\n    limit: 100000\n")
    return {**os.environ, "DATA_DIR": str(data_dir), "MASTER_KEY": KEY, "RISOLUTO_CONFIG": str(config), **extra}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_kill_9_mid_writes_loses_no_acknowledged_write(backend, risoluto_data_dir, risoluto_settings):
    settings = risoluto_settings({"secrets": {"backend": backend}})
    acknowledged: list[str] = []
    for run in range(3):  # kill at three different moments, reopening the survivor each time
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env_for(risoluto_data_dir, backend))
        assert proc.stdout is not None
        target = 40 + 37 * run
        seen = 0
        deadline = time.monotonic() + 60
        while seen < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged.append(line.strip())
            seen += 1
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
        acknowledged.extend(rest.split())  # printed before the kill: acknowledged too
        assert seen == target, err
        values = await stored_values(settings, backend, KEY)
        missing = [name for name in acknowledged if values.get(name) != "value-" + name]
        assert not missing, f"lost {len(missing)} acknowledged write(s), e.g. {missing[:3]}"
        assert set(values) >= set(acknowledged)
    assert not [n for n in os.listdir(risoluto_data_dir) if n.endswith(".tmp")]  # opening swept them



def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """The installed ``risoluto`` script serving; returned as soon as it answers or exits."""
    port = free_port()
    proc = spawn([RISOLUTO, "serve"], {**env, "RISOLUTO_PORT": str(port)}, stdout=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    wait_answering(proc, f"{base}/api/v1/runtime")
    return proc, base


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_writers_against_a_real_server(backend, risoluto_data_dir, risoluto_settings):
    proc, base = start_server(env_for(risoluto_data_dir, backend))
    try:
        assert proc.poll() is None, proc.communicate()[1]
        assert httpx.get(f"{base}/api/v1/runtime", timeout=5).status_code == 200
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            async def put(i: int) -> int:
                return (await client.put(f"/api/v1/secrets/C{i:03}", json={"value": f"v{i}"})).status_code

            statuses = await asyncio.gather(*[put(i) for i in range(120)])
            assert set(statuses) == {204}
            keys = (await client.get("/api/v1/secrets")).json()["keys"]
            assert keys == [f"C{i:03}" for i in range(120)]
    finally:
        stop(proc)
    values = await stored_values(risoluto_settings({"secrets": {"backend": backend}}), backend, KEY)
    assert values == {f"C{i:03}": f"v{i}" for i in range(120)}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_kill_9_of_the_server_mid_burst_keeps_every_acknowledged_write_and_its_audit_line(
        backend, risoluto_data_dir, risoluto_settings):
    proc, base = start_server(env_for(risoluto_data_dir, backend))
    acknowledged: list[str] = []
    killed = asyncio.Event()

    async def writer(client: httpx.AsyncClient, w: int) -> None:
        for i in range(10_000):
            name = f"K{w}_{i:05}"
            try:
                response = await client.put(f"/api/v1/secrets/{name}", json={"value": "value-" + name})
            except httpx.TransportError:
                assert killed.is_set()
                return
            assert response.status_code == 204
            acknowledged.append(name)
            if len(acknowledged) >= 150 and not killed.is_set():
                os.kill(proc.pid, signal.SIGKILL)  # with the other writers' requests in flight
                killed.set()

    try:
        assert proc.poll() is None, proc.communicate()[1]
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await asyncio.gather(*[writer(client, w) for w in range(8)])
    finally:
        stop(proc)
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    values = await stored_values(risoluto_settings({"secrets": {"backend": backend}}), backend, KEY)
    lost = [name for name in acknowledged if values.get(name) != "value-" + name]
    assert not lost, f"lost {len(lost)} acknowledged write(s), e.g. {lost[:3]}"
    raw = (risoluto_data_dir / "secrets.audit.log").read_bytes()
    assert raw.endswith(b"\n")
    audited = [json.loads(line) for line in raw.decode().splitlines()]  # every line whole
    unaudited = set(acknowledged) - {e["key"] for e in audited if e["operation"] == "set"}
    assert not unaudited, f"{len(unaudited)} acknowledged write(s) without their audit line"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_serve_with_the_wrong_key_exits_and_changes_nothing(backend, risoluto_data_dir, risoluto_settings):
    settings = risoluto_settings({"secrets": {"backend": backend}})
    store = (FileStore if backend == "file" else SqliteStore)(settings, KEY)
    await store.open()
    await store.set("A", "a")
    await store.close()
    data = risoluto_data_dir / ("secrets.enc" if backend == "file" else "risoluto.db")
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    proc, _ = start_server(env_for(risoluto_data_dir, backend, MASTER_KEY="the wrong key"))
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode != 0
    assert str(data) in err and "does not match" in err
    # one error line (a line about the Docker engine may come before it when none runs)
    errors = [line for line in err.splitlines() if line.startswith("risoluto: error:")]
    assert "Traceback" not in err and len(errors) == 1 and "does not match" in errors[0], err
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    assert await stored_values(settings, backend, KEY) == {"A": "a"}
