"""The ``postgres`` secret store: the ``encrypted_secrets`` table of the sqlite backend, on a
PostgreSQL server that several kernel instances share.

Same rows, same crypto, same guarantees as ``risoluto/plugins/secrets/sqlite_store.py``
(AES-256-GCM from the kernel's ``crypto`` module):
- ``encrypted_secrets(key TEXT PRIMARY KEY, ciphertext, iv, auth_tag, updated_at TEXT,
  aad INTEGER)``: one row per secret with its own IV and tag; ``aad`` = 1 when the key name
  is GCM associated data (a row copied under another name fails). Rows without it (the
  original's, or a table imported from its SQLite file) stay readable and are rewritten in
  the bound form on their next write or by rotation.
- ``encrypted_secrets_meta(name, value)``: ``key_check`` (an HMAC under the derived key).
  Every write checks it in the same statement, holding a share lock on that row, so an
  instance still on the old key after another instance rotated refuses to write instead of
  mixing two keys in one table. Rotation takes the row's exclusive lock, re-encrypts every
  row and updates the check in ONE transaction.
- ``open()`` reads and verifies everything before it writes anything; a key that decrypts
  nothing raises WrongMasterKey and changes nothing.
- Writes are single statements in autocommit mode (one round trip, one transaction) with
  ``synchronous_commit`` on: a write is durable when ``set()`` returns. Within a process
  they are serialized by a lock (one connection); across processes PostgreSQL's row locks
  serialize them.

Driver: psycopg 3 (async API). A dropped connection is re-opened on the next call; the call
that saw it fail raises SecretStoreError.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import anyio
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict

from risoluto.hookspecs.secrets import SecretIntegrityError, SecretStoreError
from risoluto.crypto import (
    DecryptError, FormatError, Sealed, Verified, assess, derive_key, key_check, open_row, open_value, seal_value,
)

DEFAULT_DSN = "postgresql://risoluto@127.0.0.1:5432/risoluto"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS encrypted_secrets (key TEXT PRIMARY KEY, ciphertext TEXT NOT NULL, "
    "iv TEXT NOT NULL, auth_tag TEXT NOT NULL, updated_at TEXT NOT NULL, aad INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS encrypted_secrets_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # a table made elsewhere (e.g. copied from the original's SQLite file) has legacy rows only
    "ALTER TABLE encrypted_secrets ADD COLUMN IF NOT EXISTS aad INTEGER NOT NULL DEFAULT 0",
)
# The key check and the write in one statement: the CTE takes a share lock on the check row
# (a concurrent rotation holds it exclusively) and the write happens only if it matches.
_CHECK = "chk AS (SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check' FOR SHARE)"
UPSERT = (
    f"WITH {_CHECK}, ins AS ("
    " INSERT INTO encrypted_secrets (key, ciphertext, iv, auth_tag, updated_at, aad)"
    " SELECT k, c, i, t, %(now)s, 1 FROM unnest(%(keys)s::text[], %(cts)s::text[], %(ivs)s::text[],"
    " %(tags)s::text[]) AS u(k, c, i, t) WHERE (SELECT value FROM chk) = %(check)s"
    " ON CONFLICT (key) DO UPDATE SET ciphertext = excluded.ciphertext, iv = excluded.iv,"
    " auth_tag = excluded.auth_tag, updated_at = excluded.updated_at, aad = 1 RETURNING 1)"
    " SELECT (SELECT value FROM chk), (SELECT count(*) FROM ins)"
)
DELETE = (
    f"WITH {_CHECK}, del AS (DELETE FROM encrypted_secrets WHERE key = %(key)s"
    " AND (SELECT value FROM chk) = %(check)s RETURNING 1)"
    " SELECT (SELECT value FROM chk), (SELECT count(*) FROM del)"
)
_OPEN_LOCK = "SELECT pg_advisory_xact_lock(hashtext('risoluto.encrypted_secrets'))"

LOCK_TIMEOUT_MS = 5_000
STATEMENT_TIMEOUT_MS = 30_000


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # as JS toISOString()


def redact_dsn(dsn: str) -> str:
    """``postgresql://user@host:port/db``: where the data lives, never the password."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://(unparsable DSN)"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host') or ''}{port}/{p.get('dbname') or ''}"


READ_META = "SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check'"
TABLES = "SELECT to_regclass('encrypted_secrets') IS NOT NULL, to_regclass('encrypted_secrets_meta') IS NOT NULL"
HAS_AAD = ("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('encrypted_secrets')"
           " AND attname = 'aad' AND NOT attisdropped")


class PostgresStore:
    backend = "postgres"

    def __init__(self, dsn: str, master_key: str, *, connect_timeout: int = 5):
        self.dsn = dsn
        self.location = redact_dsn(dsn)
        self.connect_timeout = connect_timeout
        self._key = derive_key(master_key)
        self._check = key_check(self._key)
        self._conn: psycopg.AsyncConnection | None = None
        self._opened = False
        self._lock = anyio.Lock()  # one connection; every call in order
        self.damaged: dict[str, str] = {}

    # -- protocol --------------------------------------------------------------------------

    async def open(self) -> None:
        async def run(conn: psycopg.AsyncConnection) -> None:
            found = await self.verify(conn)  # read-only: nothing is written before the key is proven
            async with conn.transaction():
                await conn.execute(_OPEN_LOCK)  # instances starting together create the tables once
                for statement in SCHEMA:
                    await conn.execute(statement)
                row = await (await conn.execute(READ_META + " FOR UPDATE")).fetchone()
                if (row[0] if row else None) != found.stored_check:
                    raise SecretStoreError(f"{self.location} changed while it was being opened; start again")
                await conn.execute(
                    "INSERT INTO encrypted_secrets_meta (name, value) VALUES ('key_check', %s)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (self._check,))
            self.damaged = found.damaged

        try:
            await self._run("open", run)
        except BaseException:  # refused (wrong key, ...): keep no connection open
            async with self._lock:
                await self._drop()
            raise
        self._opened = True

    async def list(self) -> list[str]:
        async def run(conn: psycopg.AsyncConnection) -> list[str]:
            # byte order, as Python's sorted(): the database's collation may differ
            cur = await conn.execute('SELECT key FROM encrypted_secrets ORDER BY key COLLATE "C"')
            return [r[0] for r in await cur.fetchall()]

        return await self._run("list", run)

    async def get(self, name: str) -> str | None:
        async def run(conn: psycopg.AsyncConnection) -> Any:
            cur = await conn.execute(
                "SELECT ciphertext, iv, auth_tag, aad FROM encrypted_secrets WHERE key = %s", (name,))
            return await cur.fetchone()

        row = await self._run("read", run)
        if row is None:
            return None
        return open_row(self._key, name, row, self.location)

    async def set(self, name: str, value: str) -> None:
        await self.set_many({name: value})

    async def set_many(self, items: dict[str, str]) -> None:
        if not items:
            return
        # sorted: two writers of overlapping sets lock rows in one order (no deadlock)
        sealed = {name: seal_value(self._key, name, items[name]) for name in sorted(items)}
        params = {
            "now": now_iso(), "check": self._check, "keys": list(sealed),
            "cts": [s.ciphertext for s in sealed.values()], "ivs": [s.iv for s in sealed.values()],
            "tags": [s.auth_tag for s in sealed.values()],
        }
        count = await self._checked_write("write", UPSERT, params)
        if count != len(items):
            raise SecretStoreError(f"{self.location}: wrote {count} of {len(items)} secrets; nothing was changed")
        for name in items:
            self.damaged.pop(name, None)

    async def delete(self, name: str) -> bool:
        count = await self._checked_write("delete", DELETE, {"key": name, "check": self._check})
        self.damaged.pop(name, None)
        return count > 0

    async def rotate(self, new_master_key: str) -> None:
        new_key = derive_key(new_master_key)

        async def run(conn: psycopg.AsyncConnection) -> None:
            async with conn.transaction():
                row = await (await conn.execute(READ_META + " FOR UPDATE")).fetchone()
                if row is not None and row[0] != self._check:
                    raise self._rekeyed()
                cur = await conn.execute(
                    "SELECT key, ciphertext, iv, auth_tag, aad FROM encrypted_secrets FOR UPDATE")
                updates, bad, now = [], [], now_iso()
                for name, ct, iv, tag, bound in await cur.fetchall():
                    try:
                        value = open_value(self._key, name, Sealed(iv=iv, auth_tag=tag, ciphertext=ct), bool(bound))[0]
                    except (DecryptError, FormatError):
                        bad.append(name)
                        continue
                    s = seal_value(new_key, name, value)
                    updates.append((s.ciphertext, s.iv, s.auth_tag, now, name))
                if bad:
                    raise SecretIntegrityError(
                        f"rotation aborted: {len(bad)} secret(s) fail authentication ({', '.join(sorted(bad)[:10])});"
                        " re-set or delete them first. Nothing was changed.")
                async with conn.cursor() as wcur:
                    await wcur.executemany(
                        "UPDATE encrypted_secrets SET ciphertext = %s, iv = %s, auth_tag = %s, updated_at = %s,"
                        " aad = 1 WHERE key = %s", updates)
                await conn.execute(
                    "INSERT INTO encrypted_secrets_meta (name, value) VALUES ('key_check', %s)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value", (key_check(new_key),))

        await self._run("rotate", run)
        self._key, self._check = new_key, key_check(new_key)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    # -- verification (read-only) ----------------------------------------------------------

    async def verify(self, conn: psycopg.AsyncConnection) -> Verified:
        has_table, has_meta = await (await conn.execute(TABLES)).fetchone()  # type: ignore[misc]
        stored = None
        if has_meta:
            row = await (await conn.execute(READ_META)).fetchone()
            stored = row[0] if row else None
        rows: list[tuple[Any, ...]] = []
        if has_table:
            aad = "aad" if (await (await conn.execute(HAS_AAD)).fetchone())[0] else "0"  # type: ignore[index]
            rows = await (await conn.execute(
                f"SELECT key, ciphertext, iv, auth_tag, {aad} FROM encrypted_secrets")).fetchall()
        return assess(self._key, self._check, rows, stored, self.location)

    # -- plumbing --------------------------------------------------------------------------

    def _rekeyed(self) -> SecretStoreError:
        return SecretStoreError(
            f"{self.location} was re-keyed by another instance (rotate-key?); restart with the new master key. "
            "Nothing was changed.")

    async def _checked_write(self, what: str, sql: str, params: dict[str, Any]) -> int:
        async def run(conn: psycopg.AsyncConnection) -> tuple[str | None, int]:
            return await (await conn.execute(sql, params)).fetchone()  # type: ignore[return-value]

        stored, count = await self._run(what, run)
        if stored is None:  # check row removed by hand: restore it (as the sqlite backend does) and retry once
            await self._run(what, lambda c: c.execute(
                "INSERT INTO encrypted_secrets_meta (name, value) VALUES ('key_check', %s)"
                " ON CONFLICT (name) DO NOTHING", (self._check,)))
            stored, count = await self._run(what, run)
        if stored != self._check:
            raise self._rekeyed()
        return count

    async def connect(self) -> psycopg.AsyncConnection:
        extra: dict[str, Any] = {"application_name": "risoluto"}
        if "connect_timeout" not in conninfo_to_dict(self.dsn):
            extra["connect_timeout"] = self.connect_timeout
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, **extra)
        try:
            sync = (await (await conn.execute("SHOW synchronous_commit")).fetchone())[0]  # type: ignore[index]
            if sync == "off":  # the server's default may trade durability for speed; we do not
                await conn.execute("SET synchronous_commit = on")
            # No wait without an end: a transaction elsewhere holding a row lock, or a stuck query,
            # would otherwise hold this store's lock and every caller behind it (the sqlite
            # backend's busy timeout is 5 s too).
            await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            await conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT_MS}ms'")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _run(self, what: str, fn: Callable[[psycopg.AsyncConnection], Awaitable[Any]]) -> Any:
        if what != "open" and not self._opened:
            raise SecretStoreError("the postgres secret store is not open")
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = await self.connect()
                return await fn(self._conn)
            except SecretStoreError:
                raise
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                raise SecretStoreError(
                    f"PostgreSQL at {self.location} is busy ({what}): a lock or the query took longer than "
                    f"{LOCK_TIMEOUT_MS // 1000} s / {STATEMENT_TIMEOUT_MS // 1000} s; try again") from None
            except psycopg.OperationalError as exc:
                await self._drop()
                raise SecretStoreError(
                    f"PostgreSQL at {self.location} is unreachable ({what}): {_first(exc)}") from None
            except psycopg.Error as exc:
                raise SecretStoreError(f"PostgreSQL at {self.location}: {what} failed: {_first(exc)}") from None
            except BaseException:  # cancelled mid-query: the connection's state is unknown
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await conn.close()
                except Exception:
                    pass


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
