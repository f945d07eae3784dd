"""A full disk under a real ``risoluto serve``, for both secret backends.

DATA_DIR is a 2 MiB tmpfs the test fills. A burst of secret sets and deletes then meets a
disk with no byte free, and one with a few pages free (enough for an audit line, not for
the store's write). Whatever each request answers: no 204 without its audit line, no audit
line without a 204, no torn line in any audit log, no 500; once space returns, every
acknowledged value is there and every refused change left the store as it was; the doctor
FAILs the audit log while the disk is full and passes it again after.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from disk_util import fill, free_bytes, small_tmpfs
from http_support import free_port
from secrets_util import stored_values
from serve_util import RISOLUTO, spawn, stop, wait_answering

from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

KEY = "full disk key"
BACKENDS = ["file", "sqlite"]
VALUE_BYTES = 3000  # a few values make secrets.enc larger than the pages left free in phase 2
AUDIT_ITEM = "credential encryption: audit log"


@pytest.fixture
def full_disk_env(tmp_path: Path) -> Any:
    def make(backend: str) -> tuple[Path, dict[str, str]]:
        config = tmp_path / "config.yaml"  # outside the tmpfs: only DATA_DIR fills up
        config.write_text(f"secrets:\n  backend: {backend}\nrateLimit:\n  api:\n    limit: 100000\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_")}
        env.update(DATA_DIR=str(data), MASTER_KEY=KEY, RISOLUTO_CONFIG=str(config),
                   DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock")
        return data, env

    data = tmp_path / "data"
    with small_tmpfs(data):
        yield make


def doctor_audit_status(env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run([*RISOLUTO, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
    items = {i["item"]: i for i in json.loads(done.stdout)["items"]}
    return done.returncode, items[AUDIT_ITEM]["status"], items["Write audit log"]["status"]


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an NDJSON log, each of which must parse (no torn or glued line)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path.name} ends mid-line: {raw[-80:]!r}"
    return [json.loads(line) for line in raw.decode().splitlines()]


def value_of(name: str, tag: str) -> str:
    return f"{tag}:{name}:".ljust(VALUE_BYTES, "v")


async def burst(client: httpx.AsyncClient, tag: str, sets: list[str], deletes: list[str]) -> list[tuple[str, str, int]]:
    """Concurrent sets and deletes; (operation, name, status) of each."""
    async def one(op: str, name: str) -> tuple[str, str, int]:
        if op == "set":
            response = await client.put(f"/api/v1/secrets/{name}", json={"value": value_of(name, tag)})
        else:
            response = await client.delete(f"/api/v1/secrets/{name}")
        if response.status_code != 204:  # a refusal is a clear JSON error, never a 500 with a trace
            error = response.json()["error"]
            assert response.status_code in (503, 507) and error["code"] in ("insufficient_storage", "audit_unavailable"), \
                (response.status_code, error)
            assert "Traceback" not in response.text and "v" * 50 not in response.text
        return op, name, response.status_code

    return await asyncio.gather(*[one("set", n) for n in sets], *[one("delete", n) for n in deletes])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_full_disk_never_acknowledges_a_change_without_its_audit_line(backend, full_disk_env):
    data, env = full_disk_env(backend)
    port = free_port()
    proc = spawn([*RISOLUTO, "serve"], {**env, "RISOLUTO_PORT": str(port)})
    base = f"http://127.0.0.1:{port}"
    expected: dict[str, str | None] = {}  # name -> the value a reader must find (None: absent)
    acknowledged: list[tuple[str, str]] = []
    try:
        assert wait_answering(proc, f"{base}/api/v1/runtime") is not None, proc.communicate()[1]
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for i in range(12):  # what is there before the disk fills
                name = f"BASE_{i:02}"
                assert (await client.put(f"/api/v1/secrets/{name}", json={"value": value_of(name, "base")})).status_code == 204
                expected[name] = value_of(name, "base")
                acknowledged.append(("set", name))
            assert doctor_audit_status(env)[1] == "PASS"

            filler = fill(data)  # phase 1: not a byte left
            code, audit_status, write_audit_status = doctor_audit_status(env)
            assert code != 0 and audit_status == "FAIL" and write_audit_status == "FAIL"
            results = await burst(client, "p1", [f"NEW1_{i:02}" for i in range(15)] + ["BASE_00", "BASE_01"],
                                  ["BASE_02", "BASE_03"])
            assert {status for *_, status in results} == {507}, results  # nothing fits, nothing is made

            os.truncate(filler, max(filler.stat().st_size - 12 * 4096, 0))  # phase 2: a few pages free
            results += await burst(client, "p2", [f"NEW2_{i:02}" for i in range(15)] + ["BASE_04", "BASE_05"],
                                   ["BASE_06", "BASE_07", "BASE_08"])
            assert any(status == 507 for *_, status in results[-20:]), results[-20:]
            assert doctor_audit_status(env)[1] == "FAIL"  # still under the doctor's margin

            filler.unlink()  # space returns
            assert free_bytes(data) > 1 << 20
            assert doctor_audit_status(env)[1] == "PASS"
            for op, name, status in results:
                if status != 204:
                    continue
                acknowledged.append((op, name))
                tag = "p1" if name.startswith("NEW1") or (op, name) in (("set", "BASE_00"), ("set", "BASE_01")) else "p2"
                expected[name] = value_of(name, tag) if op == "set" else None
            for name in ("AFTER_1", "AFTER_2"):  # the next writes are whole lines, not glued to a fragment
                assert (await client.put(f"/api/v1/secrets/{name}", json={"value": value_of(name, "after")})).status_code == 204
                expected[name] = value_of(name, "after")
                acknowledged.append(("set", name))
    finally:
        stop(proc)
        _, err = proc.communicate()
    assert "Traceback" not in err and "v" * 50 not in err  # no trace, no value in the log

    audit = audit_lines(data / "secrets.audit.log")
    # exactly the acknowledged changes, in the order they were made (a refused one left no line)
    assert sorted((e["operation"], e["key"]) for e in audit) == sorted(acknowledged)
    assert all(e["backend"] == backend and "value" not in e for e in audit)
    write_audit = audit_lines(data / "write-audit.log")
    assert write_audit and all(e["method"] in ("PUT", "DELETE") for e in write_audit)

    settings = build_settings({"secrets": {"backend": backend}}, None, {"DATA_DIR": str(data)})
    stored = await stored_values(settings, backend, KEY)
    for name, value in expected.items():
        assert stored.get(name) == value, name
    refused_new = [n for op, n, s in results if s != 204 and n.startswith("NEW")]
    assert refused_new and not set(refused_new) & set(stored)  # never half-made
    assert not [n for n in os.listdir(data) if n.endswith(".tmp")]


def test_an_append_on_a_full_disk_leaves_no_fragment_for_the_next_line_to_be_glued_to(tmp_path):
    from risoluto.fsutil import LineAppend, append_line, append_problem

    data = tmp_path / "data"
    with small_tmpfs(data, "2m"):
        log = data / "write-audit.log"
        append_line(log, json.dumps({"n": 0}))
        filler = fill(data, leave=100)  # room for part of the next line only
        long_line = json.dumps({"n": 1, "pad": "x" * 20000})
        with pytest.raises(OSError) as caught:
            append_line(log, long_line)
        assert caught.value.errno == 28  # ENOSPC, and the file is as it was
        assert log.read_bytes() == b'{"n": 0}\n'
        assert append_problem(log) is not None and "bytes free" in append_problem(log)
        filler.unlink()
        assert append_problem(log) is None
        append_line(log, long_line)
        assert [json.loads(line)["n"] for line in log.read_text().splitlines()] == [0, 1]
        # a line taken back (its change failed) leaves the file as it was, whoever appended before
        pending = LineAppend(log, json.dumps({"n": 2}))
        pending.take_back()
        assert [json.loads(line)["n"] for line in log.read_text().splitlines()] == [0, 1]
        # a tail without its line break (a writer that died mid-line) is cut, never glued to
        with open(log, "ab") as fh:
            fh.write(b'{"n": 3, "tor')
        append_line(log, json.dumps({"n": 4}))
        assert [json.loads(line)["n"] for line in log.read_text().splitlines()] == [0, 1, 4]
        with open(log, "ab") as fh:  # longer than one block read back
            fh.write(b'{"n": 5, "pad": "' + b"y" * 150_000)
        append_line(log, json.dumps({"n": 6}))
        assert [json.loads(line)["n"] for line in log.read_text().splitlines()] == [0, 1, 4, 6]


def test_the_doctor_fails_an_audit_log_it_cannot_append_to(tmp_path):
    from risoluto.fsutil import append_problem

    data = tmp_path / "data"
    with small_tmpfs(data, "2m"):
        log = data / "secrets.audit.log"
        assert append_problem(log) is None  # missing: created on the first change
        log.write_text("")
        assert append_problem(log) is None
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        try:  # root writes through file modes, not through a read-only mount
            assert "Read-only file system" in (append_problem(log) or "")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(data)], check=True)
        log.unlink()
        log.mkdir()
        assert "not a regular file" in (append_problem(log) or "")


async def test_a_wal_preallocation_that_cannot_fit_never_fills_the_disk(tmp_path, monkeypatch, caplog):
    from risoluto.plugins.secrets import sqlite_store
    from risoluto.plugins.secrets.sqlite_store import SqliteStore

    data = tmp_path / "data"
    with small_tmpfs(data, "2m"):
        settings = build_settings({"secrets": {"backend": "sqlite"}}, None, {"DATA_DIR": str(data)})
        store = SqliteStore(settings, KEY)
        await store.open()  # the WAL's usual size (~4 MiB) does not fit: not preallocated at all
        try:
            await store.set("A", "a")
            assert free_bytes(data) > 1 << 20
        finally:
            await store.close()
        # as if the space seen free were taken by another process before the zero-fill: the fill
        # meets a full disk, and is truncated back and logged
        monkeypatch.setattr(sqlite_store, "_PREALLOCATE_HEADROOM", -(1 << 30))
        wal = data / "risoluto.db-wal"
        before = free_bytes(data)
        store = SqliteStore(settings, KEY)
        with caplog.at_level("WARNING", logger="risoluto.secrets"):
            await store.open()
        try:
            assert "preallocation failed" in caplog.text and "rolled back" in caplog.text
            assert wal.stat().st_size < 1 << 20 and free_bytes(data) >= before - 64 * 1024
            await store.set("B", "b")
            assert await store.get("A") == "a" and await store.get("B") == "b"
        finally:
            await store.close()


async def test_sqlite_full_rolls_the_write_back_and_says_so(tmp_path, caplog):
    from risoluto.hookspecs.secrets import StorageFull
    from risoluto.plugins.secrets.sqlite_store import SqliteStore

    data = tmp_path / "data"
    with small_tmpfs(data, "2m"):
        settings = build_settings({"secrets": {"backend": "sqlite"}}, None, {"DATA_DIR": str(data)})
        store = SqliteStore(settings, KEY)
        await store.open()
        try:
            await store.set("KEEP", "kept value")
            filler = fill(data)
            secret = "s3cr3t-" + "z" * 60000
            with caplog.at_level("ERROR", logger="risoluto.secrets"), pytest.raises(StorageFull):
                for i in range(50):  # until the WAL needs a page the disk does not have
                    await store.set(f"BIG_{i}", secret)
            assert "the write was rolled back" in caplog.text and secret[:20] not in caplog.text
            filler.unlink()
            names = await store.list()
            assert "KEEP" in names and await store.get("KEEP") == "kept value"
            await store.set("AFTER", "after")  # the store works again once space returns
        finally:
            await store.close()
        reopened = await stored_values(settings, "sqlite", KEY)
        assert reopened["KEEP"] == "kept value" and reopened["AFTER"] == "after"
        assert all(v == secret for k, v in reopened.items() if k.startswith("BIG_"))


async def test_an_overlay_is_not_saved_or_applied_without_its_audit_line(tmp_path):
    from risoluto.testing import running_app

    data = tmp_path / "data"
    with small_tmpfs(data, "2m"):
        env = {"DATA_DIR": str(data), "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
        async with running_app(build_settings({}, None, env), environ=env) as test_app:
            client = test_app.test_client()
            kernel = test_app.app.extensions["risoluto"]
            before = kernel.settings.codex.sandbox.image
            filler = fill(data)
            response = await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"image": "img:full"}}})
            body = await response.get_json()
            assert response.status_code == 507 and body["error"]["code"] == "insufficient_storage", body
            assert kernel.settings.codex.sandbox.image == before  # not applied
            assert not (data / "config" / "overlay.yaml").exists()
            assert audit_lines(data / "config" / "overlay.audit.log") == []
            filler.unlink()
            response = await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"image": "img:after"}}})
            assert response.status_code == 200 and kernel.settings.codex.sandbox.image == "img:after"
            assert [e["keys"] for e in audit_lines(data / "config" / "overlay.audit.log")] == [["codex"]]
