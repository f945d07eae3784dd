"""Webhooks (docs/http-security.md): every error code with real HMACs, rotation, replay window, dedup in
SQLite, hand-off to risoluto_webhook_received, third-party providers."""

import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path

import pytest

from backend_support import lock_store
from http_support import MemorySecrets, SecretStorePlugin, linear_body, linear_signature
from risoluto import hookimpl
from risoluto.errors import ApiError
from risoluto.hookspecs.webhooks import hmac_sha256_matches, signing_secrets

pytestmark = pytest.mark.anyio

VECTORS = Path(__file__).resolve().parent / "vectors"
LINEAR = "lin_wh_current"
GITHUB = "gh_wh_current"
REMOTE = {"client": ("198.51.100.60", 443)}


class Received:
    def __init__(self):
        self.deliveries = []

    @hookimpl
    def risoluto_webhook_received(self, delivery):
        self.deliveries.append(delivery)


async def make(risoluto_client, secrets=None, store=True, extra=(), **kw):
    received = Received()
    memory = MemorySecrets(secrets if secrets is not None else {"LINEAR_WEBHOOK_SECRET": LINEAR,
                                                                "GITHUB_WEBHOOK_SECRET": GITHUB})
    plugins = (("test_store", SecretStorePlugin(memory if store else None)), ("received", received), *extra)
    client = await risoluto_client(plugins=plugins, **kw)
    return client, received, memory


async def post(client, path, body, headers):
    response = await client.post(path, data=body, headers=headers, scope_base=REMOTE)
    data = json.loads(await response.get_data())
    return response.status_code, data


def err(data):
    return data.get("error", {}).get("code")


def linear_headers(body, secret=LINEAR, delivery="d-1"):
    headers = {"Linear-Signature": linear_signature(body, secret), "Content-Type": "application/json"}
    if delivery is not None:
        headers["Linear-Delivery"] = delivery
    return headers


def github_headers(body, secret=GITHUB, delivery="g-1", event="issues"):
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": sig, "Content-Type": "application/json"}
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    if event is not None:
        headers["X-GitHub-Event"] = event
    return headers


def inbox_rows(data_dir):
    with sqlite3.connect(data_dir / "risoluto.db") as conn:
        return conn.execute("SELECT provider, delivery_id, event, payload FROM webhook_inbox ORDER BY id").fetchall()


# --- Linear ---------------------------------------------------------------------------------

async def test_linear_accepts_and_hands_on_once(risoluto_client, risoluto_data_dir):
    client, received, _ = await make(risoluto_client)
    body = linear_body()
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body))
    assert (status, data) == (200, {"ok": True, "duplicate": False})
    assert [(d.provider, d.delivery_id, d.event) for d in received.deliveries] == [("linear", "d-1", "Issue.create")]
    assert received.deliveries[0].payload == json.loads(body)
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body))
    assert (status, data) == (200, {"ok": True, "duplicate": True})
    assert len(received.deliveries) == 1
    assert inbox_rows(risoluto_data_dir) == [("linear", "d-1", "Issue.create", body)]


async def test_replayed_body_under_a_fresh_delivery_id_is_a_duplicate(risoluto_client, risoluto_data_dir):
    client, received, _ = await make(risoluto_client)
    body = linear_body()
    await post(client, "/webhooks/linear", body, linear_headers(body, delivery="a"))
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body, delivery="b"))
    assert (status, data["duplicate"]) == (200, True)
    assert len(received.deliveries) == 1 and len(inbox_rows(risoluto_data_dir)) == 1


async def test_linear_vector_signature_passes_then_replay_rejected(risoluto_client, risoluto_data_dir):
    client, received, _ = await make(risoluto_client, secrets={"LINEAR_WEBHOOK_SECRET": "lin_wh_vector"})
    body = (VECTORS / "linear-webhook.json").read_bytes()
    sig = "3a9b667d07e967b749d8886f5a3cd6c34695b2442a5a2aea7cf9cc79795f6297"
    assert linear_signature(body, "lin_wh_vector") == sig
    status, data = await post(client, "/webhooks/linear", body, {"Linear-Signature": sig, "Linear-Delivery": "v"})
    assert (status, err(data)) == (401, "replay_rejected")
    status, data = await post(client, "/webhooks/linear", body, {"Linear-Signature": sig[:-1] + "0",
                                                                 "Linear-Delivery": "v"})
    assert (status, err(data)) == (401, "signature_invalid")
    assert received.deliveries == [] and inbox_rows(risoluto_data_dir) == []


@pytest.mark.parametrize("skew_ms,ok", [(0, True), (59_000, True), (-59_000, True), (61_000, False),
                                        (-61_000, False), (10**12, False)])
async def test_linear_replay_window(risoluto_client, skew_ms, ok):
    client, received, _ = await make(risoluto_client)
    body = linear_body(webhookTimestamp=int(time.time() * 1000) + skew_ms)
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body))
    assert (status, err(data)) == ((200, None) if ok else (401, "replay_rejected"))
    assert len(received.deliveries) == (1 if ok else 0)


async def test_linear_rotation_previous_secret_accepted(risoluto_client):
    client, received, memory = await make(risoluto_client, secrets={"LINEAR_WEBHOOK_SECRET": "new",
                                                                    "LINEAR_WEBHOOK_SECRET_PREVIOUS": "old"})
    for i, secret in enumerate(("new", "old")):
        body = linear_body()
        status, _ = await post(client, "/webhooks/linear", body, linear_headers(body, secret, delivery=f"r{i}"))
        assert status == 200
    body = linear_body()
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body, "older", delivery="r9"))
    assert (status, err(data)) == (401, "signature_invalid")
    # read at request time: dropping the previous secret takes effect without a restart
    del memory.values["LINEAR_WEBHOOK_SECRET_PREVIOUS"]
    body = linear_body()
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body, "old", delivery="r10"))
    assert (status, err(data)) == (401, "signature_invalid")
    memory.values["LINEAR_WEBHOOK_SECRET"] = "newest"
    status, _ = await post(client, "/webhooks/linear", body, linear_headers(body, "newest", delivery="r10"))
    assert status == 200


@pytest.mark.parametrize("case,expected", [
    ("no_signature", (401, "signature_missing")),
    ("empty_signature", (401, "signature_missing")),
    ("bad_signature", (401, "signature_invalid")),
    ("uppercase_hex_ok", (200, None)),
    ("two_signatures", (401, "signature_invalid")),
    ("non_ascii_signature", (401, "signature_invalid")),
    ("huge_signature", (401, "signature_invalid")),
    ("signed_other_body", (401, "signature_invalid")),
    ("truncated_body", (401, "signature_invalid")),
    ("not_json_signed", (400, "invalid_payload")),
    ("truncated_json_signed", (400, "invalid_payload")),
    ("array_signed", (400, "invalid_payload")),
    ("no_timestamp", (400, "invalid_payload")),
    ("string_timestamp", (400, "invalid_payload")),
    ("nan_timestamp", (400, "invalid_payload")),
    ("no_delivery", (400, "delivery_missing")),
    ("blank_delivery", (400, "delivery_missing")),
    ("spacey_delivery", (400, "delivery_missing")),
])
async def test_linear_error_codes(risoluto_client, risoluto_data_dir, case, expected):
    from werkzeug.datastructures import Headers

    client, received, _ = await make(risoluto_client)
    body = linear_body()
    headers = Headers(linear_headers(body))
    now = int(time.time() * 1000)

    def signed(raw):
        headers["Linear-Signature"] = linear_signature(raw, LINEAR)
        return raw

    if case == "no_signature":
        del headers["Linear-Signature"]
    elif case == "empty_signature":
        headers["Linear-Signature"] = " "
    elif case == "bad_signature":
        headers["Linear-Signature"] = "0" * 64
    elif case == "uppercase_hex_ok":
        headers["Linear-Signature"] = headers["Linear-Signature"].upper()
    elif case == "two_signatures":
        headers.add("Linear-Signature", headers["Linear-Signature"])
    elif case == "non_ascii_signature":
        headers["Linear-Signature"] = "\u00e9" * 64
    elif case == "huge_signature":
        headers["Linear-Signature"] = "a" * 40000
    elif case == "signed_other_body":
        headers["Linear-Signature"] = linear_signature(linear_body(), LINEAR)
    elif case == "truncated_body":
        body = body[:-5]
    elif case == "not_json_signed":
        body = signed(b"action=create&type=Issue")
    elif case == "truncated_json_signed":
        body = signed(linear_body()[:-3])
    elif case == "array_signed":
        body = signed(json.dumps([{"webhookTimestamp": now}]).encode())
    elif case == "no_timestamp":
        body = signed(json.dumps({"type": "Issue"}).encode())
    elif case == "string_timestamp":
        body = signed(json.dumps({"webhookTimestamp": str(now)}).encode())
    elif case == "nan_timestamp":
        body = signed(b'{"webhookTimestamp": NaN}')
    elif case == "no_delivery":
        del headers["Linear-Delivery"]
    elif case == "blank_delivery":
        headers["Linear-Delivery"] = ""
    elif case == "spacey_delivery":
        headers["Linear-Delivery"] = "a b"
    status, data = await post(client, "/webhooks/linear", body, headers)
    assert (status, err(data)) == expected
    assert len(received.deliveries) == (1 if expected[0] == 200 else 0)
    assert len(inbox_rows(risoluto_data_dir)) == (1 if expected[0] == 200 else 0)


@pytest.mark.parametrize("store,secrets", [(False, None), (True, {}), (True, {"GITHUB_WEBHOOK_SECRET": GITHUB})])
async def test_not_configured_is_503_before_anything_else(risoluto_client, store, secrets):
    client, received, _ = await make(risoluto_client, secrets=secrets, store=store)
    body = linear_body()
    for headers in ({}, linear_headers(body)):
        status, data = await post(client, "/webhooks/linear", body, headers)
        assert (status, err(data)) == (503, "webhook_not_configured")
    assert received.deliveries == []


async def test_store_failure_is_503_and_leaks_nothing(risoluto_client):
    client, _, memory = await make(risoluto_client)
    memory.fail = True
    body = linear_body()
    response = await client.post("/webhooks/linear", data=body, headers=linear_headers(body))
    text = (await response.get_data()).decode()
    assert response.status_code == 503 and "webhook_not_configured" in text
    assert "fire" not in text and LINEAR not in text


async def test_body_over_the_limit_is_413(risoluto_client):
    client, received, _ = await make(risoluto_client)
    body = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body))
    assert (status, err(data)) == (413, "payload_too_large")


async def test_other_methods(risoluto_client):
    client, _, _ = await make(risoluto_client)
    response = await client.open("/webhooks/linear", method="GET", scope_base=REMOTE)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    for method in ("PUT", "DELETE"):  # no route matched: the write guard judges it like any write
        response = await client.open("/webhooks/linear", method=method, scope_base=REMOTE)
        assert response.status_code == 403


# --- GitHub ---------------------------------------------------------------------------------

def gh_body():
    return json.dumps({"action": "opened", "issue": {"number": time.time_ns()}}).encode()


async def test_github_accepts_dedups_and_rotates(risoluto_client, risoluto_data_dir):
    client, received, memory = await make(risoluto_client)
    body = gh_body()
    status, data = await post(client, "/webhooks/github", body, github_headers(body))
    assert (status, data) == (200, {"ok": True, "duplicate": False})
    status, data = await post(client, "/webhooks/github", body, github_headers(body))
    assert (status, data) == (200, {"ok": True, "duplicate": True})
    assert [(d.provider, d.delivery_id, d.event) for d in received.deliveries] == [("github", "g-1", "issues")]
    memory.values.update({"GITHUB_WEBHOOK_SECRET": "next", "GITHUB_WEBHOOK_SECRET_PREVIOUS": GITHUB})
    body = gh_body()
    status, _ = await post(client, "/webhooks/github", body, github_headers(body, GITHUB, delivery="g-2"))
    assert status == 200
    # the same delivery id under another provider is a different delivery
    lin = linear_body()
    status, data = await post(client, "/webhooks/linear", lin, linear_headers(lin, delivery="g-1"))
    assert (status, data["duplicate"]) == (200, False)
    assert [r[:2] for r in inbox_rows(risoluto_data_dir)] == [("github", "g-1"), ("github", "g-2"), ("linear", "g-1")]


@pytest.mark.parametrize("case,expected", [
    ("no_signature", (401, "signature_missing")),
    ("sha1_only", (401, "signature_missing")),
    ("no_prefix", (401, "signature_invalid")),
    ("sha1_prefix", (401, "signature_invalid")),
    ("bad_digest", (401, "signature_invalid")),
    ("linear_style", (401, "signature_invalid")),
    ("not_json", (400, "invalid_payload")),
    ("form_encoded", (400, "invalid_payload")),
    ("no_event", (400, "invalid_payload")),
    ("bad_event", (400, "invalid_payload")),
    ("no_delivery", (400, "delivery_missing")),
    ("two_deliveries", (400, "delivery_missing")),
    ("prefix_any_case", (200, None)),
])
async def test_github_error_codes(risoluto_client, case, expected):
    from werkzeug.datastructures import Headers

    client, received, _ = await make(risoluto_client)
    body = gh_body()
    headers = Headers(github_headers(body))

    def signed(raw):
        headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(GITHUB.encode(), raw, hashlib.sha256).hexdigest()
        return raw

    digest = hmac.new(GITHUB.encode(), body, hashlib.sha256).hexdigest()
    if case == "no_signature":
        del headers["X-Hub-Signature-256"]
    elif case == "sha1_only":
        del headers["X-Hub-Signature-256"]
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(GITHUB.encode(), body, hashlib.sha1).hexdigest()
    elif case == "no_prefix":
        headers["X-Hub-Signature-256"] = digest
    elif case == "sha1_prefix":
        headers["X-Hub-Signature-256"] = "sha1=" + digest
    elif case == "bad_digest":
        headers["X-Hub-Signature-256"] = "sha256=" + "f" * 64
    elif case == "linear_style":
        headers["X-Hub-Signature-256"] = "sha256=" + linear_signature(body, LINEAR)
    elif case == "not_json":
        body = signed(b"\xff\xfe not json")
    elif case == "form_encoded":
        body = signed(b"payload=%7B%7D")
    elif case == "no_event":
        del headers["X-GitHub-Event"]
    elif case == "bad_event":
        headers["X-GitHub-Event"] = "issues; drop table"
    elif case == "no_delivery":
        del headers["X-GitHub-Delivery"]
    elif case == "two_deliveries":
        headers.add("X-GitHub-Delivery", "g-2")
    elif case == "prefix_any_case":
        headers["X-Hub-Signature-256"] = "SHA256=" + digest
    status, data = await post(client, "/webhooks/github", body, headers)
    assert (status, err(data)) == expected
    assert len(received.deliveries) == (1 if expected[0] == 200 else 0)


# --- providers are plugins -------------------------------------------------------------------

class StandardWebhooks:
    """A third-party provider, as in the issue: Standard Webhooks (webhook-id/-timestamp/-signature)."""

    name = "standard"
    secret_names = ("STANDARD_WEBHOOK_SECRET",)

    async def verify(self, body, headers, secret):
        import base64

        keys = await signing_secrets(secret, "STANDARD_WEBHOOK_SECRET")
        msg_id, stamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
        sig = headers.get("webhook-signature")
        if not sig:
            raise ApiError(401, "signature_missing", "webhook-signature is missing.")
        signed = f"{msg_id}.{stamp}.".encode() + body
        ok = any(hmac.compare_digest(
            base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode(), sig.partition(",")[2])
            for k in keys)
        if not ok:
            raise ApiError(401, "signature_invalid", "Bad signature.")
        if not msg_id:
            raise ApiError(400, "delivery_missing", "webhook-id is missing.")
        return msg_id, "standard", json.loads(body)


class StandardPlugin:
    @hookimpl
    def risoluto_webhook_providers(self, settings):
        return [StandardWebhooks()]


async def test_third_party_provider(risoluto_client, risoluto_data_dir):
    import base64

    client, received, _ = await make(risoluto_client, secrets={"STANDARD_WEBHOOK_SECRET": "std"},
                                     extra=(("standard", StandardPlugin()),))
    body = b'{"hello": "world"}'
    sig = base64.b64encode(hmac.new(b"std", b"m1.123." + body, hashlib.sha256).digest()).decode()
    headers = {"webhook-id": "m1", "webhook-timestamp": "123", "webhook-signature": "v1," + sig}
    status, data = await post(client, "/webhooks/standard", body, headers)
    assert (status, data) == (200, {"ok": True, "duplicate": False})
    status, data = await post(client, "/webhooks/standard", body, headers)
    assert data["duplicate"] is True
    status, data = await post(client, "/webhooks/standard", body, {**headers, "webhook-signature": "v1,AAAA"})
    assert (status, err(data)) == (401, "signature_invalid")
    assert [(d.provider, d.delivery_id) for d in received.deliveries] == [("standard", "m1")]


async def test_disabling_a_provider_removes_its_route(risoluto_client):
    client, _, _ = await make(risoluto_client, env={"RISOLUTO_DISABLE_PLUGINS": "webhooks.github"})
    response = await client.post("/webhooks/github", data=b"{}")  # loopback: past the write guard
    assert response.status_code == 404


async def test_a_failing_consumer_does_not_fail_the_delivery(risoluto_client):
    class Broken:
        @hookimpl
        def risoluto_webhook_received(self, delivery):
            raise RuntimeError("consumer bug")

    client, received, _ = await make(risoluto_client, extra=(("broken", Broken()),))
    body = linear_body()
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body))
    assert (status, data) == (200, {"ok": True, "duplicate": False})


async def test_deliveries_metric(risoluto_client):
    client, _, _ = await make(risoluto_client)
    body = linear_body()
    await post(client, "/webhooks/linear", body, linear_headers(body))
    await post(client, "/webhooks/linear", body, linear_headers(body))
    await post(client, "/webhooks/linear", body, {})
    text = (await (await client.get("/metrics")).get_data()).decode()
    for result in ("accepted", "duplicate", "signature_missing"):
        assert f'risoluto_webhook_deliveries_total{{provider="linear",result="{result}"}} 1.0' in text


async def test_inbox_survives_restart_and_dedups_across_it(risoluto_client, risoluto_data_dir):
    body = linear_body()
    client, received, _ = await make(risoluto_client)
    await post(client, "/webhooks/linear", body, linear_headers(body))
    client2, received2, _ = await make(risoluto_client)
    status, data = await post(client2, "/webhooks/linear", body, linear_headers(body))
    assert data["duplicate"] is True and received2.deliveries == []
    assert (risoluto_data_dir / "risoluto.db").stat().st_mode & 0o777 == 0o600


def test_inbox_adopts_an_older_table(tmp_path):
    import anyio

    from risoluto.plugins.webhooks._store import Inbox

    db = tmp_path / "risoluto.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE webhook_inbox (provider TEXT, delivery_id TEXT, received_at TEXT)")
        conn.execute("INSERT INTO webhook_inbox VALUES ('linear', 'old-1', 'then')")

    async def run():
        inbox = Inbox(tmp_path)
        await inbox.open()
        try:
            assert await inbox.record("linear", "old-1", "e", b"{}", "now") is False
            assert await inbox.record("linear", "new-1", "e", b"{}", "now") is True
            # what the server's start reads: the old row counts as handed on, the new one not yet
            assert [d.delivery_id for d in await inbox.not_handed_on()] == ["new-1"]
        finally:
            await inbox.close()

    anyio.run(run)


def test_hmac_helper_never_raises():
    for given in ("", "zz", "\u00e9" * 64, "a" * 100000, "\x00"):
        assert hmac_sha256_matches(b"body", [b"k1", b"k2"], given) is False
    assert hmac_sha256_matches(b"body", [b"k1", b"k2"], hmac.new(b"k2", b"body", hashlib.sha256).hexdigest())


async def test_doctor(risoluto_client):
    from risoluto.doctor import run_checks

    client, _, memory = await make(risoluto_client, secrets={"LINEAR_WEBHOOK_SECRET": "x"})
    kernel = client.app.extensions["risoluto"]
    import anyio

    (result,) = [r for r in await anyio.to_thread.run_sync(run_checks, kernel) if r.item == "Webhook secrets"]
    assert result.status == "WARN" and "github" in result.reason and "x" != result.reason
    memory.values["GITHUB_WEBHOOK_SECRET"] = "y"
    (result,) = [r for r in await anyio.to_thread.run_sync(run_checks, kernel) if r.item == "Webhook secrets"]
    assert result.status == "PASS"
    lock_store(kernel)
    (result,) = [r for r in await anyio.to_thread.run_sync(run_checks, kernel) if r.item == "Webhook secrets"]
    assert result.status == "WARN"


async def test_with_the_real_secret_store(risoluto_client):
    """Secrets set through the secrets API are used by the next delivery, no restart."""
    received = Received()
    client = await risoluto_client(env={"MASTER_KEY": "webhook-test-master-key"}, plugins=(("received", received),))
    body = linear_body()
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body, "s3cret"))
    assert (status, err(data)) == (503, "webhook_not_configured")
    response = await client.post("/api/v1/secrets/LINEAR_WEBHOOK_SECRET", json={"value": "s3cret"})
    assert response.status_code == 204
    status, data = await post(client, "/webhooks/linear", body, linear_headers(body, "s3cret"))
    assert (status, data) == (200, {"ok": True, "duplicate": False})
    assert len(received.deliveries) == 1


def test_cli_doctor_reads_the_store(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_")}
    env.update({"DATA_DIR": str(tmp_path / "data"), "MASTER_KEY": "doctor-test-key"})

    def doctor():
        out = subprocess.run([sys.executable, "-m", "risoluto.cli", "doctor", "--json"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60).stdout
        (item,) = [i for i in json.loads(out)["items"] if i["item"] == "Webhook secrets"]
        return item

    assert doctor()["status"] == "WARN" and not (tmp_path / "data").exists()  # the doctor created nothing
    for name in ("LINEAR_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET"):
        subprocess.run([sys.executable, "-m", "risoluto.cli", "secrets", "set", name], input="v4lue", env=env,
                       cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)
    item = doctor()
    assert item["status"] == "PASS" and "v4lue" not in json.dumps(item)


async def test_a_locked_database_does_not_starve_other_requests_of_threads(risoluto_client, risoluto_data_dir):
    # another process holds risoluto.db's write lock; deliveries wait for it on the inbox's own
    # thread, not on anyio's shared ones (40), which the overlay GET below needs
    import sqlite3

    import anyio

    client, received, _ = await make(risoluto_client)
    blocker = sqlite3.connect(risoluto_data_dir / "risoluto.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    answers = []

    async def deliver(n):
        body = linear_body()
        status, _ = await post(client, "/webhooks/linear", body, linear_headers(body, delivery=f"lock-{n}"))
        answers.append(status)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(45):
                tg.start_soon(deliver, n)
            await anyio.sleep(0.5)
            with anyio.fail_after(2):
                assert (await client.get("/api/v1/config/overlay")).status_code == 200
            blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert answers == [200] * 45 and len(received.deliveries) == 45


# --- a crash between storing and handing on -------------------------------------------------


def handed_on(data_dir):
    with sqlite3.connect(data_dir / "risoluto.db") as conn:
        return conn.execute("SELECT delivery_id, handed_on FROM webhook_inbox ORDER BY id").fetchall()


def crash_before_hand_on(data_dir, delivery_id):
    """What a process killed between the INSERT's commit and the hand-on leaves behind."""
    conn = sqlite3.connect(data_dir / "risoluto.db")
    with conn:
        conn.execute("UPDATE webhook_inbox SET handed_on = 0 WHERE delivery_id = ?", (delivery_id,))
    conn.close()


async def test_a_delivery_stored_but_not_handed_on_is_handed_on_at_the_next_start(risoluto_client,
                                                                                    risoluto_data_dir):
    client, received, _ = await make(risoluto_client)
    body = linear_body()
    assert (await post(client, "/webhooks/linear", body, linear_headers(body, delivery="d-9")))[0] == 200
    assert handed_on(risoluto_data_dir) == [("d-9", 1)]
    crash_before_hand_on(risoluto_data_dir, "d-9")

    _, after_restart, _ = await make(risoluto_client)  # a new server on the same DATA_DIR
    assert [(d.provider, d.delivery_id, d.event) for d in after_restart.deliveries] == [
        ("linear", "d-9", received.deliveries[0].event)]
    assert after_restart.deliveries[0].payload == json.loads(body)
    assert handed_on(risoluto_data_dir) == [("d-9", 1)]
    _, third_start, _ = await make(risoluto_client)
    assert third_start.deliveries == []


async def test_a_senders_retry_hands_on_what_a_crash_left_stored(risoluto_client, risoluto_data_dir):
    client, received, _ = await make(risoluto_client)
    body = b'{"action": "opened"}'
    headers = github_headers(body, delivery="g-7")
    assert (await post(client, "/webhooks/github", body, headers)) == (200, {"ok": True, "duplicate": False})
    crash_before_hand_on(risoluto_data_dir, "g-7")  # as if stored by a run that then died
    # the sender got no answer then, so it retries: still a duplicate, and now handed on
    assert (await post(client, "/webhooks/github", body, headers)) == (200, {"ok": True, "duplicate": True})
    assert [d.delivery_id for d in received.deliveries] == ["g-7", "g-7"]
    assert (await post(client, "/webhooks/github", body, headers)) == (200, {"ok": True, "duplicate": True})
    assert len(received.deliveries) == 2 and handed_on(risoluto_data_dir) == [("g-7", 1)]


async def test_rows_from_before_the_hand_on_mark_are_not_replayed(risoluto_client, risoluto_data_dir):
    risoluto_data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(risoluto_data_dir / "risoluto.db")
    with conn:
        conn.execute("CREATE TABLE webhook_inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, provider TEXT NOT NULL DEFAULT '',"
                     " delivery_id TEXT NOT NULL DEFAULT '', event TEXT NOT NULL DEFAULT '', body_sha256 TEXT,"
                     " payload BLOB, received_at TEXT NOT NULL DEFAULT '')")
        conn.execute("INSERT INTO webhook_inbox (provider, delivery_id, event, body_sha256, payload, received_at)"
                     " VALUES ('linear', 'old-1', 'Issue.create', 'x', '{}', '2026-01-01T00:00:00.000Z')")
    conn.close()
    _, received, _ = await make(risoluto_client)
    assert received.deliveries == [] and handed_on(risoluto_data_dir) == [("old-1", 1)]


async def test_concurrent_copies_of_a_delivery_are_handed_on_once(risoluto_client, risoluto_data_dir):
    import asyncio

    client, received, _ = await make(risoluto_client)
    for n in range(5):
        body = json.dumps({"action": "opened", "n": n}).encode()
        headers = github_headers(body, delivery=f"c-{n}")
        answers = await asyncio.gather(*[post(client, "/webhooks/github", body, headers) for _ in range(12)])
        assert sorted(data["duplicate"] for _, data in answers) == [False] + [True] * 11
    assert sorted(d.delivery_id for d in received.deliveries) == [f"c-{n}" for n in range(5)]
    assert all(flag == 1 for _, flag in handed_on(risoluto_data_dir))
