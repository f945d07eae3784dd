"""A client that hangs up mid-write: the write, its audit line and its hand-off all still happen.

Quart cancels a handler when its client disconnects. Each test holds the write at a gate inside
the store, disconnects the client there, opens the gate, and checks that nothing after the
commit was skipped: the audit lines, the hand-off to consumers, the settings swap.
"""

from __future__ import annotations

import json
import os
import threading
import time

import anyio
import pytest
from http_support import linear_signature

from risoluto import hookimpl
from risoluto.settings import build_settings
from risoluto.testing import running_app

pytestmark = pytest.mark.anyio

KEY = "disconnect test master key"


class Gate:
    """Holds a call made in a worker thread until ``open``; says when a call has arrived."""

    def __init__(self):
        self.arrived = threading.Event()
        self.opened = threading.Event()

    def wrap(self, fn):
        def held(*args, **kwargs):
            self.arrived.set()
            self.opened.wait(30)
            return fn(*args, **kwargs)

        return held


async def leaves_mid_request(app, method, path, body, gate, headers=()):
    """One ASGI request whose client disconnects once the write has reached ``gate``."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:4000"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *headers],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 4000), "extensions": {}}
    sent: list[dict] = []
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.to_thread.run_sync(gate.arrived.wait, 30)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    gate.opened.set()
    return sent


async def eventually(check, seconds=10.0):
    with anyio.fail_after(seconds):
        while not check():
            await anyio.sleep(0.02)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path


async def test_a_secret_set_is_audited_even_if_the_client_leaves(data_dir, monkeypatch):
    from risoluto.plugins.secrets.sqlite_store import SqliteStore

    gate = Gate()
    monkeypatch.setattr(SqliteStore, "_set_sync", gate.wrap(SqliteStore._set_sync))
    env = {"DATA_DIR": str(data_dir), "MASTER_KEY": KEY}
    settings = build_settings({"secrets": {"backend": "sqlite"}}, None, env)
    async with running_app(settings, environ=env) as test_app:
        sent = await leaves_mid_request(test_app.app, "PUT", "/api/v1/secrets/LEFT",
                                        json.dumps({"value": "v"}).encode(), gate)
        assert not [m for m in sent if m["type"] == "http.response.start"]  # really cut off
        audit = data_dir / "secrets.audit.log"
        await eventually(lambda: any('"LEFT"' in line for line in lines(audit)))
        client = test_app.test_client()
        assert (await (await client.get("/api/v1/secrets")).get_json())["keys"] == ["LEFT"]
        written = [json.loads(line) for line in lines(data_dir / "write-audit.log")]
        assert [(e["method"], e["path"], e["status"]) for e in written] == [("PUT", "/api/v1/secrets/LEFT", 499)]


async def test_an_overlay_put_is_applied_and_audited_even_if_the_client_leaves(data_dir, monkeypatch):
    from risoluto import overlay

    gate = Gate()
    monkeypatch.setattr(overlay, "atomic_write", gate.wrap(overlay.atomic_write))
    env = {"DATA_DIR": str(data_dir)}
    async with running_app(build_settings({}, None, env), environ=env) as test_app:
        kernel = test_app.app.extensions["risoluto"]
        body = json.dumps({"codex": {"sandbox": {"image": "img:after-leaving"}}}).encode()
        await leaves_mid_request(test_app.app, "PUT", "/api/v1/config/overlay", body, gate)
        audit = data_dir / "config" / "overlay.audit.log"
        # the audit line is written first, then the overlay saved, then applied
        await eventually(lambda: kernel.settings.codex.sandbox.image == "img:after-leaving")
        assert len(lines(audit)) == 1
        assert "img:after-leaving" in (data_dir / "config" / "overlay.yaml").read_text()


class Received:
    def __init__(self):
        self.deliveries = []

    @hookimpl
    def risoluto_webhook_received(self, delivery):
        self.deliveries.append(delivery.delivery_id)


async def test_a_webhook_is_handed_on_even_if_the_sender_leaves(data_dir, monkeypatch):
    # otherwise the sender's retry is a duplicate, and the delivery never reaches a consumer
    from risoluto.plugins.webhooks._store import Inbox

    gate = Gate()
    monkeypatch.setattr(Inbox, "_record_sync", gate.wrap(Inbox._record_sync))
    received = Received()
    env = {"DATA_DIR": str(data_dir), "MASTER_KEY": KEY}
    settings = build_settings({}, None, env)
    async with running_app(settings, plugins=(("received", received),), environ=env) as test_app:
        client = test_app.test_client()
        gate.opened.set()  # the secret below is stored through the gate unheld
        assert (await client.put("/api/v1/secrets/LINEAR_WEBHOOK_SECRET", json={"value": "lin"})).status_code == 204
        gate.arrived.clear()
        gate.opened.clear()
        body = json.dumps({"action": "create", "type": "Issue", "data": {"id": os.urandom(6).hex()},
                           "webhookTimestamp": int(time.time() * 1000)}).encode()
        headers = [(b"linear-signature", linear_signature(body, "lin").encode()), (b"linear-delivery", b"d-left")]
        await leaves_mid_request(test_app.app, "POST", "/webhooks/linear", body, gate, headers)
        await eventually(lambda: received.deliveries == ["d-left"])

