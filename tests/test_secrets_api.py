"""The secret routes (docs/secrets.md) from a client's side: locked mode, bad input, audit, metrics, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from secrets_util import stored_values

from risoluto.errors import StartupError
from risoluto.hookspecs import hookimpl
from risoluto.kernel import Kernel

pytestmark = pytest.mark.anyio

KEY = "api test key"
BACKENDS = ["file", "sqlite"]
MARKER = "S3CRET-VALUE-MARKER-8d1f"
NO_LIMITS = {"rateLimit": {"api": {"limit": 100000}}}


def config(backend: str) -> dict:
    return {**NO_LIMITS, "secrets": {"backend": backend}}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.is_file() and p.name in ("secrets.enc", "secrets.audit.log")}


async def test_locked_without_a_key(risoluto_client, risoluto_data_dir):
    client = await risoluto_client()
    assert (await client.get("/api/v1/runtime")).status_code == 200
    for method, path, body in [("GET", "/api/v1/secrets", None), ("PUT", "/api/v1/secrets/A", {"value": "v"}),
                               ("POST", "/api/v1/secrets/A", {"value": "v"}), ("DELETE", "/api/v1/secrets/A", None)]:
        response = await client.open(path, method=method, json=body)
        assert response.status_code == 503, (method, path)
        assert (await response.get_json())["error"]["code"] == "secrets_locked"
    assert not (risoluto_data_dir / "secrets.enc").exists()
    health = await (await client.get("/api/v1/hardening")).get_json()
    item = next(i for i in health["items"] if i["item"] == "credential encryption: master key")
    assert item["status"] == "WARN" and "locked" in item["reason"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_set_list_delete(backend, risoluto_client, risoluto_settings):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    for method in ("PUT", "POST"):
        response = await client.open(f"/api/v1/secrets/B_{method}", method=method, json={"value": MARKER})
        assert response.status_code == 204 and await response.get_data() == b""
    response = await client.get("/api/v1/secrets")
    body = await response.get_data(as_text=True)
    assert json.loads(body) == {"keys": ["B_POST", "B_PUT"]} and MARKER not in body
    assert (await client.delete("/api/v1/secrets/B_PUT")).status_code == 204
    missing = await client.delete("/api/v1/secrets/B_PUT")
    assert missing.status_code == 404 and (await missing.get_json())["error"]["code"] == "secret_not_found"
    reading = await client.get("/api/v1/secrets/B_POST")  # there is no route that returns a value
    assert reading.status_code == 405 and MARKER not in await reading.get_data(as_text=True)
    assert await stored_values(risoluto_settings(config(backend)), backend, KEY) == {"B_POST": MARKER}


BAD_NAMES = ["a%2Fb", "a/b", "..%2Fx", "a%00b", "a%20b", "caf%C3%A9", "x" * 257, "a\\b"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_invalid_names_change_nothing(backend, risoluto_client, risoluto_data_dir, risoluto_settings):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/KEEP", json={"value": "kept"})).status_code == 204
    before = tree_digest(risoluto_data_dir)
    for name in BAD_NAMES:
        for method in ("PUT", "POST", "DELETE"):
            response = await client.open(f"/api/v1/secrets/{name}", method=method, json={"value": "v"})
            assert 400 <= response.status_code < 500, (name, method, response.status_code)
            if response.status_code == 400:
                assert (await response.get_json())["error"]["code"] == "invalid_secret_key"
    for path in ("/api/v1/secrets/", "/api/v1/secrets//"):  # empty name
        assert 400 <= (await client.put(path, json={"value": "v"})).status_code < 500
    assert (await client.put(f"/api/v1/secrets/{'x' * 256}", json={"value": "v"})).status_code == 204
    assert (await client.delete(f"/api/v1/secrets/{'x' * 256}")).status_code == 204
    after = await stored_values(risoluto_settings(config(backend)), backend, KEY)
    assert after == {"KEEP": "kept"}
    if backend == "file":
        assert tree_digest(risoluto_data_dir)["secrets.enc"] != before["secrets.enc"]  # the 256-char set wrote


BAD_BODIES = [
    ("missing", json.dumps({})), ("null", json.dumps({"value": None})), ("number", json.dumps({"value": 123})),
    ("list", json.dumps({"value": ["x"]})), ("object", json.dumps({"value": {"a": "b"}})),
    ("empty", json.dumps({"value": ""})), ("surrogate", '{"value": "\\ud800"}'),
    ("too big", json.dumps({"value": "x" * (64 * 1024 + 1)})),
    ("too big utf8", json.dumps({"value": "é" * (32 * 1024 + 1)}, ensure_ascii=False)),
]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_invalid_values_change_nothing(backend, risoluto_client, risoluto_data_dir, risoluto_settings):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/KEEP", json={"value": "kept"})).status_code == 204
    before = tree_digest(risoluto_data_dir)
    for label, body in BAD_BODIES:
        response = await client.put("/api/v1/secrets/KEEP", data=body.encode(),
                                    headers={"Content-Type": "application/json"})
        assert response.status_code == 400, label
        error = (await response.get_json())["error"]
        assert error["code"] == "invalid_secret_value", label
        assert "xxxx" not in error["message"] and "éé" not in error["message"]
    for raw, code in [(b"{not json", "invalid_json"), (b'"just a string"', "invalid_json")]:
        response = await client.put("/api/v1/secrets/KEEP", data=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and (await response.get_json())["error"]["code"] == code
    huge = await client.put("/api/v1/secrets/KEEP", json={"value": "y" * (1024 * 1024)})
    assert huge.status_code == 413
    assert tree_digest(risoluto_data_dir) == before
    assert await stored_values(risoluto_settings(config(backend)), backend, KEY) == {"KEEP": "kept"}
    exactly = "z" * (64 * 1024)
    assert (await client.put("/api/v1/secrets/MAX", json={"value": exactly})).status_code == 204
    assert (await stored_values(risoluto_settings(config(backend)), backend, KEY))["MAX"] == exactly


@pytest.mark.parametrize("backend", BACKENDS)
async def test_audit_log_records_who_and_never_the_value(backend, risoluto_client, risoluto_data_dir, caplog):
    caplog.set_level(logging.DEBUG)
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/AUDITED", json={"value": MARKER})).status_code == 204
    assert (await client.delete("/api/v1/secrets/AUDITED")).status_code == 204
    assert (await client.delete("/api/v1/secrets/AUDITED")).status_code == 404  # no change, no line
    log_path = risoluto_data_dir / "secrets.audit.log"
    text = log_path.read_text()
    assert MARKER not in text and MARKER not in caplog.text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["operation"], e["key"]) for e in lines] == [("set", "AUDITED"), ("delete", "AUDITED")]
    for entry in lines:
        assert set(entry) == {"at", "operation", "key", "principal", "remote", "backend"}
        assert entry["remote"] == "127.0.0.1" and entry["principal"] == "loopback" and entry["backend"] == backend
        assert entry["at"].endswith("Z")
    assert log_path.stat().st_mode & 0o777 == 0o600


async def test_metrics_count_operations(risoluto_client):
    client = await risoluto_client(config=config("sqlite"), env={"MASTER_KEY": KEY})
    await client.put("/api/v1/secrets/A", json={"value": "v"})
    await client.put("/api/v1/secrets/B", json={"value": "v"})
    await client.delete("/api/v1/secrets/A")
    await client.get("/api/v1/secrets")
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert 'risoluto_secret_operations_total{backend="sqlite",operation="set",outcome="ok"} 2.0' in text
    assert 'risoluto_secret_operations_total{backend="sqlite",operation="delete",outcome="ok"} 1.0' in text
    assert 'risoluto_secret_operations_total{backend="sqlite",operation="list",outcome="ok"} 1.0' in text


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_writers_lose_nothing(backend, risoluto_client, risoluto_settings, risoluto_data_dir):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})

    async def put(i: int) -> int:
        response = await client.put(f"/api/v1/secrets/K{i:03}", json={"value": f"value-{i}"})
        return response.status_code

    async def overwrite(i: int) -> int:
        return (await client.put("/api/v1/secrets/SHARED", json={"value": f"shared-{i}"})).status_code

    statuses = await asyncio.gather(*[put(i) for i in range(150)], *[overwrite(i) for i in range(50)])
    assert set(statuses) == {204}
    listed = (await (await client.get("/api/v1/secrets")).get_json())["keys"]
    assert len(listed) == 151
    values = await stored_values(risoluto_settings(config(backend)), backend, KEY)
    assert {k: v for k, v in values.items() if k != "SHARED"} == {f"K{i:03}": f"value-{i}" for i in range(150)}
    assert values["SHARED"] in {f"shared-{i}" for i in range(50)}
    audit = (risoluto_data_dir / "secrets.audit.log").read_text().splitlines()
    assert len(audit) == 200


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failed_write_leaves_memory_and_disk_unchanged(backend, risoluto_client, risoluto_data_dir,
                                                             risoluto_settings):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/A", json={"value": "a"})).status_code == 204
    target = risoluto_data_dir if backend == "file" else risoluto_data_dir / "risoluto.db-wal"
    # immutable even for root: every write below really fails in the kernel
    subprocess.run(["chattr", "+i", str(target)], check=True)
    try:
        response = await client.put("/api/v1/secrets/B", json={"value": MARKER})
        assert response.status_code == 503
        body = await response.get_data(as_text=True)
        assert json.loads(body)["error"]["code"] == "secret_store_unavailable" and MARKER not in body
        assert (await (await client.get("/api/v1/secrets")).get_json()) == {"keys": ["A"]}
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert await stored_values(risoluto_settings(config(backend)), backend, KEY) == {"A": "a"}
    assert (await client.put("/api/v1/secrets/C", json={"value": "c"})).status_code == 204  # recovers
    assert await stored_values(risoluto_settings(config(backend)), backend, KEY) == {"A": "a", "C": "c"}
    assert not [n for n in os.listdir(risoluto_data_dir) if n.endswith(".tmp")]


async def test_unknown_backend_is_a_startup_error(risoluto_settings):
    kernel = Kernel(risoluto_settings({"secrets": {"backend": "vualt"}}, {"MASTER_KEY": KEY}))
    with pytest.raises(StartupError, match="unknown backend 'vualt'"):
        await kernel.start()


async def test_master_key_file(risoluto_client, risoluto_data_dir, risoluto_settings):
    key_file = risoluto_data_dir / "master.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    with pytest.raises(StartupError, match="chmod 600"):
        await Kernel(risoluto_settings()).start()
    key_file.write_text("  \n")
    key_file.chmod(0o600)
    with pytest.raises(StartupError, match="empty"):
        await Kernel(risoluto_settings()).start()
    key_file.write_text(KEY + "\n")
    client = await risoluto_client()
    assert (await client.put("/api/v1/secrets/A", json={"value": "a"})).status_code == 204
    assert await stored_values(risoluto_settings(), "file", KEY) == {"A": "a"}  # the newline is not part of the key


async def test_doctor_reports_loose_file_modes(risoluto_client, risoluto_data_dir):
    client = await risoluto_client(env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/A", json={"value": "a"})).status_code == 204
    health = await (await client.get("/api/v1/hardening")).get_json()
    items = {i["item"]: i for i in health["items"]}
    assert items["credential encryption: file modes"]["status"] == "PASS"
    assert items["credential encryption: store"]["status"] == "PASS"
    (risoluto_data_dir / "secrets.enc").chmod(0o644)
    health = await (await client.get("/api/v1/hardening")).get_json()
    items = {i["item"]: i for i in health["items"]}
    assert items["credential encryption: file modes"]["status"] == "FAIL"
    assert "secrets.enc" in items["credential encryption: file modes"]["reason"]


class BrokenRecorder:
    """A third-party write-ahead recorder whose store of record is down."""

    @hookimpl
    def risoluto_secret_changing(self, event, settings):
        raise RuntimeError("journal down")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_change_whose_audit_line_cannot_be_written_is_refused_and_not_made(
        backend, risoluto_client, risoluto_data_dir, risoluto_settings):
    client = await risoluto_client(config=config(backend), env={"MASTER_KEY": KEY})
    assert (await client.put("/api/v1/secrets/KEEP", json={"value": "kept"})).status_code == 204
    log_path = risoluto_data_dir / "secrets.audit.log"
    log_path.unlink()
    log_path.mkdir()  # no line can be appended there (as a read-only file would refuse it)
    for response in (await client.put("/api/v1/secrets/NEW", json={"value": MARKER}),
                     await client.put("/api/v1/secrets/KEEP", json={"value": MARKER}),
                     await client.delete("/api/v1/secrets/KEEP")):
        body = await response.get_json()
        assert response.status_code == 503 and body["error"]["code"] == "audit_unavailable", body
        assert MARKER not in json.dumps(body)
    assert (await stored_values(risoluto_settings(config(backend)), backend, KEY)) == {"KEEP": "kept"}
    log_path.rmdir()
    assert (await client.put("/api/v1/secrets/NEW", json={"value": "new"})).status_code == 204
    assert [json.loads(line)["key"] for line in log_path.read_text().splitlines()] == ["NEW"]


async def test_a_failing_third_party_recorder_refuses_the_change(risoluto_client, risoluto_data_dir, risoluto_settings):
    client = await risoluto_client(config=config("sqlite"), env={"MASTER_KEY": KEY},
                                   plugins=(("test.broken_recorder", BrokenRecorder()),))
    response = await client.put("/api/v1/secrets/NEW", json={"value": "v"})
    assert response.status_code == 503 and (await response.get_json())["error"]["code"] == "audit_unavailable"
    assert (await stored_values(risoluto_settings(config("sqlite")), "sqlite", KEY)) == {}
