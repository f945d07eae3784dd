"""encrypted_secrets rows: legacy rows from the original, name binding, swap, corruption, re-keying."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from risoluto.errors import StartupError
from risoluto.hookspecs.secrets import SecretIntegrityError, SecretStoreError, WrongMasterKey
from risoluto.kernel import Kernel
from risoluto.plugins.secrets.sqlite_store import SqliteStore

pytestmark = pytest.mark.anyio

NODE_SCRIPT = Path(__file__).parent / "interop" / "secrets_envelope.js"
SQLITE = {"secrets": {"backend": "sqlite"}}
KEY = "sqlite test key"


def node(*args: str, key: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(NODE_SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "MASTER_KEY": key}, timeout=60)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def original_table(db: Path, rows: dict[str, str], key: str) -> None:
    """What the original Risoluto leaves behind: compat columns only, rows sealed without AAD."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE encrypted_secrets (key TEXT PRIMARY KEY, ciphertext TEXT, iv TEXT, auth_tag TEXT, "
                 "updated_at TEXT)")
    for name, value in rows.items():
        made = node("seal-row", key=key, stdin=value)
        assert made.returncode == 0, made.stderr
        sealed = json.loads(made.stdout)
        conn.execute("INSERT INTO encrypted_secrets VALUES (?, ?, ?, ?, ?)",
                     (name, sealed["ciphertext"], sealed["iv"], sealed["authTag"], "2024-01-01T00:00:00.000Z"))
    conn.commit()
    conn.close()


def row(db: Path, name: str) -> tuple:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT ciphertext, iv, auth_tag, aad FROM encrypted_secrets WHERE key = ?",
                            (name,)).fetchone()
    finally:
        conn.close()


async def opened(settings, key: str = KEY) -> SqliteStore:
    store = SqliteStore(settings, key)
    await store.open()
    return store


async def start(settings) -> Kernel:
    kernel = Kernel(settings)
    await kernel.start()
    await kernel.stop()
    return kernel


async def test_legacy_rows_are_read_and_upgraded_on_write(risoluto_data_dir, risoluto_settings, risoluto_client):
    db = risoluto_data_dir / "risoluto.db"
    original_table(db, {"OLD_A": "value a ✓", "OLD_B": "value b"}, KEY)
    client = await risoluto_client(config=SQLITE, env={"MASTER_KEY": KEY})
    assert await (await client.get("/api/v1/secrets")).get_json() == {"keys": ["OLD_A", "OLD_B"]}
    health = await (await client.get("/api/v1/hardening")).get_json()
    store_item = next(i for i in health["items"] if i["item"] == "credential encryption: store")
    assert store_item["status"] == "WARN" and "2 row(s)" in store_item["reason"]
    assert (await client.put("/api/v1/secrets/OLD_A", json={"value": "new a"})).status_code == 204

    ct, iv, tag, aad = row(db, "OLD_A")
    assert aad == 1
    sealed = json.dumps({"ciphertext": ct, "iv": iv, "authTag": tag})
    bound = node("open-row", "OLD_A", key=KEY, stdin=sealed)  # Node with the name as AAD
    assert bound.returncode == 0 and bound.stdout == "new a"
    assert node("open-row", key=KEY, stdin=sealed).returncode != 0  # no longer the unbound form
    assert node("open-row", "OLD_B", key=KEY, stdin=sealed).returncode != 0  # bound to OLD_A only
    assert row(db, "OLD_B")[3] == 0
    store = await opened(risoluto_settings(SQLITE))
    assert await store.get("OLD_A") == "new a" and await store.get("OLD_B") == "value b"
    await store.close()


async def test_row_moved_under_another_name_fails_and_nothing_is_lost(risoluto_data_dir, risoluto_settings):
    settings = risoluto_settings(SQLITE)
    store = await opened(settings)
    await store.set("ADMIN_TOKEN", "admin-secret")
    await store.set("PUBLIC_NAME", "harmless")
    await store.close()
    db = risoluto_data_dir / "risoluto.db"
    # the attacker copies ADMIN_TOKEN's ciphertext over PUBLIC_NAME and under a new name,
    # and even marks one copy as a legacy (unbound) row
    conn = sqlite3.connect(db)
    ct, iv, tag, _ = row(db, "ADMIN_TOKEN")
    conn.execute("UPDATE encrypted_secrets SET ciphertext = ?, iv = ?, auth_tag = ? WHERE key = 'PUBLIC_NAME'",
                 (ct, iv, tag))
    conn.execute("INSERT INTO encrypted_secrets VALUES ('STOLEN', ?, ?, ?, 'x', 0)", (ct, iv, tag))
    conn.commit()
    conn.close()

    store = await opened(settings)  # the rest of the store stays usable
    assert sorted(store.damaged) == ["PUBLIC_NAME", "STOLEN"]
    assert await store.get("ADMIN_TOKEN") == "admin-secret"
    for name in ("PUBLIC_NAME", "STOLEN"):
        with pytest.raises(SecretIntegrityError, match=f"{name}.*fails authentication") as info:
            await store.get(name)
        assert "admin-secret" not in str(info.value)
    with pytest.raises(SecretIntegrityError, match="rotation aborted"):
        await store.rotate("another key")
    await store.close()
    assert row(db, "PUBLIC_NAME")[0] == ct  # evidence kept, nothing rewritten by the failed rotation
    store = await opened(settings)
    assert await store.get("ADMIN_TOKEN") == "admin-secret"
    await store.close()


async def test_doctor_names_tampered_rows(risoluto_data_dir, risoluto_settings, risoluto_client):
    store = await opened(risoluto_settings(SQLITE))
    await store.set("A", "a")
    await store.set("B", "b")
    await store.close()
    conn = sqlite3.connect(risoluto_data_dir / "risoluto.db")
    conn.execute("UPDATE encrypted_secrets SET key = 'C' WHERE key = 'A'")
    conn.commit()
    conn.close()
    client = await risoluto_client(config=SQLITE, env={"MASTER_KEY": KEY})
    health = await (await client.get("/api/v1/hardening")).get_json()
    item = next(i for i in health["items"] if i["item"] == "credential encryption: store")
    assert item["status"] == "FAIL" and "C" in item["reason"]


async def test_wrong_key_refuses_to_start_and_changes_nothing(risoluto_data_dir, risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    await store.set("A", "a")
    await store.close()
    db = risoluto_data_dir / "risoluto.db"
    before = digest(db)
    env = {"MASTER_KEY": "wrong key"}
    with pytest.raises(StartupError) as info:
        await start(risoluto_settings(SQLITE, env))
    assert str(db) in str(info.value) and "does not match" in str(info.value)
    assert digest(db) == before


async def test_wrong_key_is_detected_on_an_empty_table(risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    await store.set("A", "a")
    await store.delete("A")
    await store.close()
    with pytest.raises(WrongMasterKey):
        await opened(risoluto_settings(SQLITE), "wrong key")


@pytest.mark.parametrize("damage", ["header", "middle", "truncate"])
async def test_corrupted_database_is_a_clear_startup_error(damage, risoluto_data_dir, risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    await store.set_many({f"S{i:04}": "x" * 200 for i in range(300)})
    await store.close()
    db = risoluto_data_dir / "risoluto.db"
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[0:100] = os.urandom(100)
    elif damage == "middle":
        data[len(data) // 2: len(data) // 2 + 3000] = os.urandom(3000)
    else:
        data = data[: len(data) // 2]
    db.write_bytes(bytes(data))
    before = digest(db)
    with pytest.raises(StartupError, match="corrupted: restore it from a backup") as info:
        await start(risoluto_settings(SQLITE, {"MASTER_KEY": KEY}))
    assert str(db) in str(info.value)
    assert digest(db) == before


async def test_a_process_with_the_old_key_cannot_write_after_rotation(risoluto_settings):
    settings = risoluto_settings(SQLITE)
    stale = await opened(settings)
    await stale.set("A", "a")
    rotating = await opened(settings)
    await rotating.rotate("new key")
    await rotating.close()
    with pytest.raises(SecretStoreError, match="re-keyed"):
        await stale.set("B", "b")
    with pytest.raises(SecretIntegrityError):
        await stale.get("A")
    await stale.close()
    fresh = await opened(settings, "new key")
    assert await fresh.list() == ["A"] and await fresh.get("A") == "a"
    await fresh.close()
    with pytest.raises(WrongMasterKey):
        await opened(settings, KEY)


async def test_database_files_are_private(risoluto_data_dir, risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    await store.set("A", "a")
    for name in ("risoluto.db", "risoluto.db-wal", "risoluto.db-shm"):
        assert (risoluto_data_dir / name).stat().st_mode & 0o777 == 0o600, name
    await store.close()


async def test_sqlite_set_does_not_rewrite_other_rows(risoluto_data_dir, risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    await store.set_many({"A": "a", "B": "b"})
    before = row(risoluto_data_dir / "risoluto.db", "A")
    await store.set("B", "b2")
    assert row(risoluto_data_dir / "risoluto.db", "A") == before
    await store.close()


@pytest.mark.parametrize("backend", ["file", "sqlite"])
async def test_writes_racing_a_rotation_never_mix_keys(backend, risoluto_settings):
    import asyncio

    from risoluto.plugins.secrets.file_store import FileStore

    settings = risoluto_settings({"secrets": {"backend": backend}})
    store = (FileStore if backend == "file" else SqliteStore)(settings, KEY)
    await store.open()
    await store.set_many({f"OLD{i}": f"old{i}" for i in range(50)})

    async def writer(i: int) -> str | None:
        try:
            await store.set(f"NEW{i}", f"new{i}")
            return f"NEW{i}"
        except SecretStoreError:
            return None  # refused because the key changed under it: acceptable, nothing written

    results = await asyncio.gather(*[writer(i) for i in range(20)], store.rotate("rotated key"),
                                   *[writer(i) for i in range(20, 40)])
    await store.close()
    acknowledged = {r for r in results if r}
    fresh = (FileStore if backend == "file" else SqliteStore)(settings, "rotated key")
    await fresh.open()
    assert getattr(fresh, "damaged", {}) == {}  # every row decrypts with the new key
    names = set(await fresh.list())
    assert names >= acknowledged | {f"OLD{i}" for i in range(50)}
    for name in names:
        assert await fresh.get(name) in (f"old{name[3:]}", f"new{name[3:]}")
    await fresh.close()


async def test_updated_at_is_written_as_the_original_writes_it(risoluto_data_dir, risoluto_settings):
    """UTC with milliseconds, as JS toISOString(): by set, set_many and rotation alike."""
    import re
    import time
    from datetime import datetime

    def stamps() -> dict[str, str]:
        conn = sqlite3.connect(risoluto_data_dir / "risoluto.db")
        try:
            return dict(conn.execute("SELECT key, updated_at FROM encrypted_secrets").fetchall())
        finally:
            conn.close()

    def check(stamp: str, after: float) -> None:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        assert after - 0.002 <= at <= time.time() + 0.002, (stamp, after)

    store = await opened(risoluto_settings(SQLITE))
    t0 = time.time()
    await store.set("ONE", "1")
    await store.set_many({"TWO": "2", "THREE": "3"})
    for stamp in stamps().values():
        check(stamp, t0)
    time.sleep(0.01)
    t1 = time.time()
    await store.set("ONE", "1b")
    assert stamps()["ONE"] > stamps()["TWO"]
    check(stamps()["ONE"], t1)
    t2 = time.time()
    await store.rotate("rotated key")
    for stamp in stamps().values():
        check(stamp, t2)
    await store.close()


@pytest.mark.parametrize("backend", ["file", "sqlite"])
async def test_writes_after_a_rotation_use_the_new_key(backend, risoluto_settings):
    from risoluto.plugins.secrets.file_store import FileStore

    settings = risoluto_settings({"secrets": {"backend": backend}})
    kind = FileStore if backend == "file" else SqliteStore
    store = kind(settings, KEY)
    await store.open()
    await store.set("OLD", "old")
    await store.rotate("rotated key")
    await store.set("NEW", "new")
    assert await store.get("NEW") == "new"
    await store.close()
    fresh = kind(settings, "rotated key")
    await fresh.open()
    assert getattr(fresh, "damaged", {}) == {}
    assert {n: await fresh.get(n) for n in await fresh.list()} == {"OLD": "old", "NEW": "new"}
    await fresh.close()


async def test_concurrent_set_many_calls_all_succeed(risoluto_settings):
    """A cursor handed back to the event loop reset its statement from there while the
    connection thread was using the connection: about 3% of these calls failed with a raw
    sqlite3.InterfaceError."""
    import asyncio

    store = await opened(risoluto_settings(SQLITE))

    async def writer(i: int) -> None:
        for j in range(30):
            await store.set_many({f"A{i}": f"a{j}", f"B{i}": f"b{j}"})
            if j % 10 == 0:
                assert await store.delete(f"B{i}") is True
                assert await store.delete(f"B{i}") is False

    await asyncio.gather(*[writer(i) for i in range(20)])
    assert {n: await store.get(n) for n in await store.list()} == {
        **{f"A{i}": "a29" for i in range(20)}, **{f"B{i}": "b29" for i in range(20)}}
    await store.close()


async def test_a_read_racing_a_rotation_opens_the_row_with_its_own_key(risoluto_settings):
    """get() reads on the connection thread; a rotation queued right behind it swaps the key
    before the event loop gets round to decrypting (here: another request holds the loop)."""
    import asyncio
    import time

    store = await opened(risoluto_settings(SQLITE))
    await store.set("TOKEN", "v")

    async def busy() -> None:
        time.sleep(0.05)

    for _ in range(3):
        got, _, _ = await asyncio.gather(store.get("TOKEN"), store.rotate("k2" if _ % 2 == 0 else KEY), busy())
        assert got == "v"
    await store.close()


def _our_locks(path: Path) -> list[str]:
    """This process's POSIX locks on ``path``: /proc/locks lines "N: POSIX ADVISORY READ pid maj:min:inode ..."."""
    inode, pid = str(os.stat(path).st_ino), str(os.getpid())
    with open("/proc/locks") as fh:
        held = [line.split() for line in fh if "->" not in line]  # "->": a waiter, not a holder
    return [" ".join(f) for f in held if f[1] == "POSIX" and f[4] == pid and f[5].rsplit(":", 1)[1] == inode]


def test_making_sure_a_database_file_exists_keeps_sqlites_locks(tmp_path):
    """Closing any descriptor of a file drops all of the process's POSIX locks on it."""
    from risoluto.fsutil import ensure_private_file

    db = ensure_private_file(tmp_path / "risoluto.db")
    assert db.stat().st_mode & 0o777 == 0o600 and db.stat().st_size == 0
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    before = _our_locks(db)
    assert before, "SQLite holds no lock to lose: the test proves nothing"
    ensure_private_file(db)  # what the second component to open the database does
    assert _our_locks(db) == before
    conn.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["risoluto.db"]  # no temporary file left


async def test_the_cli_cannot_pull_the_database_from_under_the_server(risoluto_data_dir, risoluto_settings):
    """The server has the secret store and the webhook inbox open on risoluto.db; CLI writes
    come and go. Once the inbox dropped the server's locks, the CLI took the database for
    unused, checkpointed and deleted the WAL under the server, and acknowledged writes were lost."""
    import sys

    from risoluto.plugins.webhooks._store import Inbox

    settings = risoluto_settings(SQLITE)
    server = await opened(settings)
    inbox = Inbox(risoluto_data_dir)
    await inbox.open()
    cli = (
        "import asyncio, sys\n"
        "from risoluto.settings import build_settings\n"
        "from risoluto.plugins.secrets.sqlite_store import SqliteStore\n"
        "async def main():\n"
        "    s = SqliteStore(build_settings({'secrets': {'backend': 'sqlite'}}, None, {'DATA_DIR': sys.argv[1]}),"
        " sys.argv[2])\n"
        "    await s.open(); await s.set(sys.argv[3], 'cli'); await s.close()\n"
        "asyncio.run(main())\n"
    )

    def cli_set(name: str) -> None:
        subprocess.run([sys.executable, "-c", cli, str(risoluto_data_dir), KEY, name], check=True, timeout=60)

    await server.set("A", "server")
    cli_set("C")
    await server.set("B", "server")
    cli_set("D")
    cli_set("E")
    await server.set("F", "server")
    assert await server.list() == ["A", "B", "C", "D", "E", "F"]
    await inbox.close()
    await server.close()
    fresh = await opened(settings)
    assert await fresh.list() == ["A", "B", "C", "D", "E", "F"]
    await fresh.close()


WAL_WORKING_SIZE = 32 + 1000 * (4096 + 24)  # header + SQLite's default checkpoint threshold in frames


async def test_commits_overwrite_a_preallocated_wal_instead_of_growing_it(risoluto_data_dir, risoluto_settings):
    store = await opened(risoluto_settings(SQLITE))
    wal = risoluto_data_dir / "risoluto.db-wal"
    size = wal.stat().st_size
    assert size >= WAL_WORKING_SIZE
    for i in range(40):
        await store.set(f"S{i}", f"value-{i}")
    assert wal.stat().st_size == size  # every commit landed in space that was already there
    assert wal.stat().st_mode & 0o777 == 0o600
    await store.close()


async def test_preallocating_keeps_every_frame_another_connection_left(risoluto_data_dir, risoluto_settings, tmp_path):
    """A WAL shorter than the working size, holding frames no checkpoint copied yet (another
    process writing with SQLite's defaults): growing it must not touch one of them, and a crash
    image taken afterwards (the files copied mid-flight, no -shm) must recover all of them."""
    from risoluto.crypto import derive_key, seal_value
    from risoluto.plugins.secrets.sqlite_store import _UPSERT

    settings = risoluto_settings(SQLITE)
    await (await opened(settings)).close()  # schema and key check, then the WAL is gone
    db = risoluto_data_dir / "risoluto.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA wal_autocheckpoint = 0")  # its frames stay in the WAL
    key = derive_key(KEY)
    for i in range(30):
        s = seal_value(key, f"O{i}", f"other-{i}")
        other.execute(_UPSERT, (f"O{i}", s.ciphertext, s.iv, s.auth_tag))
    wal = risoluto_data_dir / "risoluto.db-wal"
    assert 0 < wal.stat().st_size < WAL_WORKING_SIZE
    store = await opened(settings)
    assert wal.stat().st_size >= WAL_WORKING_SIZE
    await store.set("MINE", "mine")
    s = seal_value(key, "LATE", "late")  # the other writer appends into the zeroed space
    other.execute(_UPSERT, ("LATE", s.ciphertext, s.iv, s.auth_tag))
    expected = {**{f"O{i}": f"other-{i}" for i in range(30)}, "MINE": "mine", "LATE": "late"}
    assert {n: await store.get(n) for n in await store.list()} == expected
    crash = tmp_path / "crash-image"
    crash.mkdir(mode=0o700)
    for name in ("risoluto.db", "risoluto.db-wal"):
        (crash / name).write_bytes((risoluto_data_dir / name).read_bytes())
    await store.close()
    other.close()
    recovered = await opened(risoluto_settings(SQLITE, {"DATA_DIR": str(crash)}))
    assert recovered.path == crash / "risoluto.db"
    assert {n: await recovered.get(n) for n in await recovered.list()} == expected
    await recovered.close()


async def test_a_failed_preallocation_is_logged_and_the_store_works(risoluto_settings, monkeypatch, caplog):
    import errno

    from risoluto.plugins.secrets import sqlite_store

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sqlite_store.os, "pwrite", full)
    store = await opened(risoluto_settings(SQLITE))
    await store.set("A", "a")
    assert await store.get("A") == "a"
    await store.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "risoluto.secrets"]
    assert any("preallocation failed" in w and "No space left" in w for w in warnings), warnings
