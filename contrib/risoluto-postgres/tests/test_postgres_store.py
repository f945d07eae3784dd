"""risoluto-postgres against a real PostgreSQL: several kernel instances share one
``encrypted_secrets`` table with the sqlite backend's format and guarantees.

The plugin is found through its installed entry point and selected by
``secrets.backend: postgres``; instances are real apps (HTTP API) and CLI processes; the
table is inspected and attacked with a plain SQL connection.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from risoluto.app import kernel_of
from risoluto.hookspecs.secrets import SecretIntegrityError, SecretStoreError, WrongMasterKey
from risoluto.crypto import derive_key, seal
from risoluto.plugins.secrets.sqlite_store import SqliteStore
from risoluto.settings import build_settings
from risoluto.testing import running_app
from risoluto_postgres.store import PostgresStore

pytestmark = pytest.mark.anyio

KEY = "correct horse battery staple"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(tmp_path, name, master_key=KEY):
    env = {"DATA_DIR": str(tmp_path / name), "MASTER_KEY": master_key}
    return build_settings({"secrets": {"backend": "postgres"}}, None, env)


def rows(db):
    return db.execute("SELECT key, ciphertext, iv, auth_tag, updated_at, aad FROM encrypted_secrets ORDER BY key"
                      ).fetchall()


def meta(db):
    return db.execute("SELECT name, value FROM encrypted_secrets_meta ORDER BY name").fetchall()


def cli(tmp_path, dsn, *args, stdin="", master_key=KEY):
    config = tmp_path / "config.yaml"
    config.write_text("secrets:\n  backend: postgres\n")
    env = {k: v for k, v in os.environ.items() if k != "MASTER_KEY"}
    env.update(DATA_DIR=str(tmp_path / "cli"), RISOLUTO_CONFIG=str(config), RISOLUTO_POSTGRES_DSN=dsn,
               MASTER_KEY=master_key)
    return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


async def opened(dsn, key=KEY):
    store = PostgresStore(dsn, key)
    await store.open()
    return store


# -- discovery and selection ------------------------------------------------------------------


def test_found_through_its_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "risoluto.cli", "plugins", "--json"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DATA_DIR": str(tmp_path)})
    found = {r["name"]: r for r in json.loads(result.stdout)}
    assert found["postgres"]["source"] == "entry point"
    assert found["postgres"]["distribution"] == "risoluto-postgres"
    assert set(found["postgres"]["hooks"]) == {"risoluto_secret_store", "risoluto_doctor_checks",
                                               "risoluto_settings_validate", "risoluto_checklist_provides"}


def test_configured_from_the_config_file_alone(tmp_path, schema_dsn):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"secrets": {"backend": "postgres"},
                                  "plugins": {"settings": {"postgres": {"dsn": schema_dsn}}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_KEY", "RISOLUTO_POSTGRES_DSN")}
    env.update(DATA_DIR=str(tmp_path / "file"), RISOLUTO_CONFIG=str(config), MASTER_KEY=KEY)

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], input=stdin, capture_output=True,
                              text=True, timeout=60, env=env)

    assert run("secrets", "set", "FROM_FILE", stdin="v1\n").returncode == 0
    listed = run("secrets", "list")
    assert listed.returncode == 0 and "FROM_FILE" in listed.stdout
    # the environment variable overrides the file: an unreachable server there is a clear error
    env["RISOLUTO_POSTGRES_DSN"] = f"postgresql://risoluto@127.0.0.1:{free_port()}/risoluto?connect_timeout=2"
    assert run("secrets", "list").returncode != 0


def test_a_bad_dsn_setting_stops_startup_naming_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"plugins": {"settings": {"postgres": {"dsn": "garbage no equals", "x": 1}}}}))
    result = subprocess.run([sys.executable, "-m", "risoluto.cli", "config", "check"], capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "DATA_DIR": str(tmp_path / "d"), "RISOLUTO_CONFIG": str(config)})
    assert result.returncode != 0 and "plugins.settings.postgres.x: unknown key" in result.stderr


# -- several instances ------------------------------------------------------------------------


async def test_two_instances_see_each_others_secrets(tmp_path, pg_env, db):
    async with running_app(settings_for(tmp_path, "a")) as a, running_app(settings_for(tmp_path, "b")) as b:
        ca, cb = a.test_client(), b.test_client()
        assert kernel_of(a.app).backends.secrets.store.backend == "postgres"
        response = await ca.post("/api/v1/secrets/LINEAR_WEBHOOK_SECRET", json={"value": "s3cret-from-a"})
        assert response.status_code == 204
        assert (await cb.put("/api/v1/secrets/GITHUB_WEBHOOK_SECRET", json={"value": "from-b"})).status_code == 204
        for client in (ca, cb):
            listed = await client.get("/api/v1/secrets")
            assert (await listed.get_json()) == {"keys": ["GITHUB_WEBHOOK_SECRET", "LINEAR_WEBHOOK_SECRET"]}
        assert await kernel_of(b.app).backends.secrets.store.get("LINEAR_WEBHOOK_SECRET") == "s3cret-from-a"
        assert await kernel_of(a.app).backends.secrets.store.get("GITHUB_WEBHOOK_SECRET") == "from-b"
        assert (await cb.delete("/api/v1/secrets/LINEAR_WEBHOOK_SECRET")).status_code == 204
        assert (await ca.delete("/api/v1/secrets/LINEAR_WEBHOOK_SECRET")).status_code == 404
        assert await kernel_of(a.app).backends.secrets.store.get("LINEAR_WEBHOOK_SECRET") is None
    # the values live only in PostgreSQL, encrypted: not in either DATA_DIR, not in clear in the table
    for name in ("a", "b"):
        assert not (tmp_path / name / "secrets.enc").exists()
        lite = tmp_path / name / "risoluto.db"  # other plugins (the webhook inbox) may keep their tables there
        if lite.exists():
            con = sqlite3.connect(lite)
            assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'encrypted_secrets'").fetchall()
            con.close()
    [(key, ct, iv, tag, updated, aad)] = rows(db)
    assert key == "GITHUB_WEBHOOK_SECRET" and aad == 1 and "from-b" not in ct
    assert len(base64.b64decode(iv)) == 12 and len(base64.b64decode(tag)) == 16
    assert updated.endswith("Z") and len(updated) == 24  # ISO-8601 as the original's toISOString()


async def test_concurrent_writers_lose_no_acknowledged_write(schema_dsn):
    stores = [await opened(schema_dsn) for _ in range(2)]
    try:
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(stores[i % 2].set, f"K{i:02d}", f"value-{i}")
                tg.start_soon(stores[(i + 1) % 2].set, "SHARED", f"shared-{i}")
        assert await stores[0].list() == [f"K{i:02d}" for i in range(60)] + ["SHARED"]
        for i in range(60):
            assert await stores[1].get(f"K{i:02d}") == f"value-{i}"
        assert (await stores[0].get("SHARED")).startswith("shared-")
    finally:
        for store in stores:
            await store.close()


async def test_set_many_is_all_or_nothing(schema_dsn, db):
    store = await opened(schema_dsn)
    try:
        await store.set_many({"A": "1", "B": "2"})
        db.execute("ALTER TABLE encrypted_secrets ADD CONSTRAINT short_keys CHECK (length(key) < 3)")
        with pytest.raises(SecretStoreError) as err:
            await store.set_many({"C": "3", "TOO_LONG": "4", "A": "changed"})
        assert "changed" not in str(err.value)
        assert [r[0] for r in rows(db)] == ["A", "B"] and await store.get("A") == "1"
    finally:
        await store.close()


# -- format and integrity ---------------------------------------------------------------------


async def test_rows_are_interchangeable_with_the_sqlite_backend(tmp_path, schema_dsn, db):
    lite = SqliteStore(settings_for(tmp_path, "lite"), KEY)
    await lite.open()
    await lite.set("FROM_SQLITE", "lite-value")
    store = await opened(schema_dsn)
    try:
        await store.set("FROM_POSTGRES", "pg-value")
        con = sqlite3.connect(lite.path)
        lite_row = con.execute(
            "SELECT key, ciphertext, iv, auth_tag, updated_at, aad FROM encrypted_secrets").fetchone()
        db.execute("INSERT INTO encrypted_secrets VALUES (%s, %s, %s, %s, %s, %s)", lite_row)
        assert await store.get("FROM_SQLITE") == "lite-value"
        pg_row = next(r for r in rows(db) if r[0] == "FROM_POSTGRES")
        with con:
            con.execute("INSERT INTO encrypted_secrets VALUES (?, ?, ?, ?, ?, ?)", pg_row)
        con.close()
        assert await lite.get("FROM_POSTGRES") == "pg-value"
    finally:
        await store.close()
        await lite.close()


async def test_tampered_and_swapped_rows_are_rejected(tmp_path, pg_env, db):
    store = await opened(pg_env)
    await store.set_many({"ALPHA": "alpha-value", "BETA": "beta-value", "GAMMA": "gamma-value"})
    await store.close()
    ct = base64.b64decode(db.execute("SELECT ciphertext FROM encrypted_secrets WHERE key = 'ALPHA'").fetchone()[0])
    flipped = base64.b64encode(bytes([ct[0] ^ 1]) + ct[1:]).decode()
    db.execute("UPDATE encrypted_secrets SET ciphertext = %s WHERE key = 'ALPHA'", (flipped,))
    # BETA's row replaced by GAMMA's ciphertext: valid under the key, but bound to another name
    db.execute("UPDATE encrypted_secrets b SET ciphertext = g.ciphertext, iv = g.iv, auth_tag = g.auth_tag "
               "FROM encrypted_secrets g WHERE b.key = 'BETA' AND g.key = 'GAMMA'")
    async with running_app(settings_for(tmp_path, "a")) as app:
        live = kernel_of(app.app).backends.secrets.store
        assert set(live.damaged) == {"ALPHA", "BETA"}
        for name in ("ALPHA", "BETA"):
            with pytest.raises(SecretIntegrityError) as err:
                await live.get(name)
            assert "value" not in str(err.value)
        assert await live.get("GAMMA") == "gamma-value"
    item = doctor_item(tmp_path, pg_env)
    assert item["status"] == "FAIL" and "ALPHA" in item["reason"] and "BETA" in item["reason"]


async def test_legacy_rows_are_read_and_upgraded(schema_dsn, db):
    # a table as the original makes it: no aad column, values encrypted without associated data
    db.execute("CREATE TABLE encrypted_secrets (key TEXT PRIMARY KEY, ciphertext TEXT, iv TEXT, auth_tag TEXT, "
               "updated_at TEXT)")
    sealed = seal(derive_key(KEY), b"legacy-value")
    db.execute("INSERT INTO encrypted_secrets VALUES ('OLD', %s, %s, %s, '2024-01-01T00:00:00.000Z')",
               (sealed.ciphertext, sealed.iv, sealed.auth_tag))
    store = await opened(schema_dsn)
    try:
        assert await store.get("OLD") == "legacy-value"
        assert rows(db)[0][5] == 0  # column added, row still legacy
        await store.set("OLD", "legacy-value")
        assert rows(db)[0][5] == 1
        db.execute("INSERT INTO encrypted_secrets (key, ciphertext, iv, auth_tag, updated_at, aad) "
                   "SELECT 'MOVED', ciphertext, iv, auth_tag, updated_at, 0 FROM encrypted_secrets WHERE key = 'OLD'")
        with pytest.raises(SecretIntegrityError):  # a bound row does not pass as legacy under another name
            await store.get("MOVED")
    finally:
        await store.close()


# -- keys -------------------------------------------------------------------------------------


async def test_wrong_master_key_is_refused_and_changes_nothing(tmp_path, schema_dsn, pg_env, db):
    store = await opened(schema_dsn)
    await store.set("A", "1")
    await store.close()
    before = (rows(db), meta(db))
    with pytest.raises(WrongMasterKey) as err:
        await opened(schema_dsn, "another key")
    assert "does not match" in str(err.value)
    result = cli(tmp_path, schema_dsn, "secrets", "list", master_key="another key")
    assert result.returncode != 0 and "does not match" in result.stderr and "A" not in result.stdout
    assert (rows(db), meta(db)) == before
    with pytest.raises(Exception, match="does not match"):  # StartupError, through Quart's lifespan
        async with running_app(settings_for(tmp_path, "x", master_key="another key")):
            pass
    assert (rows(db), meta(db)) == before


async def test_rotation_is_one_transaction_and_fences_old_key_instances(tmp_path, schema_dsn, db):
    old = await opened(schema_dsn)
    await old.set_many({"A": "1", "B": "2"})
    result = cli(tmp_path, schema_dsn, "secrets", "rotate-key", stdin="the new key\n")
    assert result.returncode == 0, result.stderr
    with pytest.raises(SecretStoreError) as err:  # still running on the old key: refused, not mixed in
        await old.set("C", "3")
    assert "re-keyed" in str(err.value)
    with pytest.raises(SecretStoreError):
        await old.delete("A")
    await old.close()
    new = await opened(schema_dsn, "the new key")
    try:
        assert [await new.get(n) for n in ("A", "B")] == ["1", "2"] and await new.get("C") is None
        # a damaged row aborts a rotation before anything changes
        zero_tag = base64.b64encode(bytes(16)).decode()
        db.execute("UPDATE encrypted_secrets SET auth_tag = %s WHERE key = 'B'", (zero_tag,))
        before = (rows(db), meta(db))
        with pytest.raises(SecretIntegrityError):
            await new.rotate("a third key")
        assert (rows(db), meta(db)) == before and await new.get("A") == "1"
    finally:
        await new.close()
    with pytest.raises(WrongMasterKey):
        await opened(schema_dsn)  # the old key opens nothing any more


async def test_rotation_racing_writers_never_mixes_keys(schema_dsn, db):
    writer, rotator = await opened(schema_dsn), await opened(schema_dsn)
    acknowledged, refused = [], []

    rotated = anyio.Event()

    async def write_loop():
        i, after = 0, 0
        while after < 3:  # until a few writes after the rotation committed
            after += rotated.is_set()
            try:
                await writer.set(f"W{i:03d}", f"value-{i}")
                acknowledged.append(f"W{i:03d}")
            except SecretStoreError as exc:
                assert "re-keyed" in str(exc)
                refused.append(i)
            i += 1
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_loop)
        while len(acknowledged) < 3:
            await anyio.sleep(0.001)
        await rotator.rotate("the new key")
        rotated.set()
    await writer.close()
    await rotator.close()
    check = await opened(schema_dsn, "the new key")  # opens: every row is under the new key
    try:
        assert check.damaged == {}
        assert await check.list() == acknowledged  # every acknowledged write survived, nothing else
        assert refused and acknowledged  # the race really happened on both sides
    finally:
        await check.close()


# -- failures ---------------------------------------------------------------------------------


def test_unreachable_postgres_is_a_clear_startup_error(tmp_path, pg_dsn):
    dsn = f"postgresql://risoluto:hunter2@127.0.0.1:{free_port()}/risoluto"
    result = cli(tmp_path, dsn, "secrets", "list")
    assert result.returncode == 2
    assert "PostgreSQL at postgresql://risoluto@127.0.0.1:" in result.stderr and "unreachable" in result.stderr
    assert "hunter2" not in result.stderr
    config = tmp_path / "config.yaml"
    env = {k: v for k, v in os.environ.items() if k != "MASTER_KEY"}
    env.update(DATA_DIR=str(tmp_path / "serve"), RISOLUTO_CONFIG=str(config), RISOLUTO_POSTGRES_DSN=dsn,
               MASTER_KEY=KEY, RISOLUTO_PORT=str(free_port()))
    serve = subprocess.run([sys.executable, "-m", "risoluto.cli", "serve"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert serve.returncode != 0 and "unreachable" in serve.stderr and "hunter2" not in serve.stderr


async def test_lost_connection_is_a_503_then_recovers(tmp_path, pg_env, admin):
    async with running_app(settings_for(tmp_path, "a")) as app:
        client = app.test_client()
        assert (await client.post("/api/v1/secrets/A", json={"value": "1"})).status_code == 204
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'risoluto' AND pid <> pg_backend_pid()")
        failed = await client.post("/api/v1/secrets/B", json={"value": "2"})
        assert failed.status_code == 503
        assert (await failed.get_json())["error"]["code"] == "secret_store_unavailable"
        assert (await client.post("/api/v1/secrets/B", json={"value": "2"})).status_code == 204
        assert (await (await client.get("/api/v1/secrets")).get_json()) == {"keys": ["A", "B"]}


async def test_writes_are_durable_even_if_the_server_default_is_not(schema_dsn):
    store = await opened(make_conninfo(schema_dsn, options=schema_options(schema_dsn) + " -c synchronous_commit=off"))
    try:
        await store.set("A", "1")
        assert (await (await store._conn.execute("SHOW synchronous_commit")).fetchone())[0] == "on"
    finally:
        await store.close()


def schema_options(dsn):
    return psycopg.conninfo.conninfo_to_dict(dsn)["options"]


def test_location_never_shows_the_password():
    store = PostgresStore("postgresql://risoluto:hunter2@db.internal:5433/risoluto", KEY)
    assert store.location == "postgresql://risoluto@db.internal:5433/risoluto"
    assert "hunter2" not in PostgresStore("host=db user=u password=hunter2 dbname=d", KEY).location


# -- doctor -----------------------------------------------------------------------------------


def doctor_item(tmp_path, dsn, master_key=KEY):
    result = cli(tmp_path, dsn, "doctor", "--json", master_key=master_key)
    return next(i for i in json.loads(result.stdout)["items"] if i["item"] == "credential encryption: store")


async def test_doctor_pass_warn_fail(tmp_path, schema_dsn, db):
    assert doctor_item(tmp_path, schema_dsn)["status"] == "PASS"  # empty: nothing to check yet
    store = await opened(schema_dsn)
    await store.set("A", "1")
    await store.close()
    item = doctor_item(tmp_path, schema_dsn)
    assert item["status"] == "PASS" and "key matches" in item["reason"]
    wrong = doctor_item(tmp_path, schema_dsn, master_key="another key")
    assert wrong["status"] == "FAIL" and "does not match" in wrong["reason"]
    sealed = seal(derive_key(KEY), b"legacy")
    db.execute("INSERT INTO encrypted_secrets VALUES ('OLD', %s, %s, %s, 'x', 0)",
               (sealed.ciphertext, sealed.iv, sealed.auth_tag))
    assert doctor_item(tmp_path, schema_dsn)["status"] == "WARN"
    down = doctor_item(tmp_path, f"postgresql://risoluto:hunter2@127.0.0.1:{free_port()}/risoluto")
    assert down["status"] == "FAIL" and "unreachable" in down["reason"] and "hunter2" not in json.dumps(down)


async def test_a_lock_held_elsewhere_is_a_clear_error_in_seconds_not_a_hang(schema_dsn, db):
    # another session holds the key check row (as a rotation elsewhere would) and does not let go
    store = await opened(schema_dsn)
    try:
        await store.set("A", "1")
        with psycopg.connect(schema_dsn) as holder:  # not autocommit: the lock stays until rollback
            holder.execute("SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check' FOR UPDATE")
            with anyio.fail_after(15):
                with pytest.raises(SecretStoreError, match="busy"):
                    await store.set("B", "2")
                assert await store.get("A") == "1"  # the store itself is free again at once
            holder.rollback()
        await store.set("B", "2")
        assert await store.get("B") == "2"
    finally:
        await store.close()
