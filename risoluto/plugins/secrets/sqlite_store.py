"""``sqlite`` secret backend: table ``encrypted_secrets`` in ``<DATA_DIR>/risoluto.db`` (docs/secrets.md).

One row per secret with its own IV and tag; the key name is GCM associated data (column
``aad`` = 1), so a row copied under another name fails. Rows written by the original
(no associated data, ``aad`` = 0 by the column default) stay readable and are rewritten
in the bound form on their next write (or all at once by ``rotate-key``).

``encrypted_secrets_meta.key_check`` (an HMAC under the derived key) lets a process see,
inside its write transaction, that another process rotated the key: it then refuses to
write rather than mix two keys in one table. WAL + ``synchronous=FULL``: a commit is on
disk when ``set()`` returns. Write transactions are ``BEGIN IMMEDIATE`` and short, since
other plugins (the webhook inbox) share the database file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from typing import TYPE_CHECKING, Any, Callable

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from risoluto.fsutil import ensure_private_dir, ensure_private_file
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.secrets import SecretIntegrityError, SecretStoreError, StorageFull
from risoluto.keys import key_for_check
from risoluto.worker_thread import WorkerThread, finished, started
from risoluto.crypto import (
    DecryptError, FormatError, Sealed, Verified, assess, derive_key, key_check, open_row, open_value, seal_value,
)

if TYPE_CHECKING:
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

DB_NAME = "risoluto.db"
# Free space a WAL preallocation must leave: past this it would take what commits need.
_PREALLOCATE_HEADROOM = 64 << 20
_WAL_HEADER, _WAL_FRAME_HEADER = 32, 24  # bytes, from SQLite's WAL file format
log = logging.getLogger("risoluto.secrets")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS encrypted_secrets (key TEXT PRIMARY KEY, ciphertext TEXT NOT NULL, "
    "iv TEXT NOT NULL, auth_tag TEXT NOT NULL, updated_at TEXT NOT NULL, aad INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS encrypted_secrets_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# updated_at as JS toISOString() writes it (UTC, milliseconds), by SQLite: off the event loop,
# where a Python timestamp cost 10-20 us right after a wake-up
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_UPSERT = (
    f"INSERT INTO encrypted_secrets (key, ciphertext, iv, auth_tag, updated_at, aad) VALUES (?, ?, ?, ?, {_NOW}, 1) "
    "ON CONFLICT(key) DO UPDATE SET ciphertext = excluded.ciphertext, iv = excluded.iv, "
    "auth_tag = excluded.auth_tag, updated_at = excluded.updated_at, aad = 1"
)
# One statement, one implicit transaction: writes only while key_check is still ours.
_GUARDED_UPSERT = (
    f"INSERT INTO encrypted_secrets (key, ciphertext, iv, auth_tag, updated_at, aad) SELECT ?, ?, ?, ?, {_NOW}, 1 "
    "WHERE (SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check') = ? "
    "ON CONFLICT(key) DO UPDATE SET ciphertext = excluded.ciphertext, iv = excluded.iv, "
    "auth_tag = excluded.auth_tag, updated_at = excluded.updated_at, aad = 1"
)


@attrs.frozen
class _Keys:
    """The master key's derived key, its check and its cipher, swapped as one object, so a
    reader never pairs one key's cipher with another key's check."""

    key: bytes
    check: str
    cipher: AESGCM

    @classmethod
    def of(cls, key: bytes) -> _Keys:
        return cls(key=key, check=key_check(key), cipher=AESGCM(key))


class SqliteStore:
    backend = "sqlite"

    def __init__(self, settings: Settings, master_key: str):
        self.path = settings.data_path / DB_NAME
        self.location = str(self.path)
        # replaced only on the connection thread, right after a rotation's COMMIT
        self._keys = _Keys.of(derive_key(master_key))
        self._conn: sqlite3.Connection | None = None
        # owns the connection and runs every query in submission order, one at a time: that
        # queue is what serializes mutations (no extra lock, no extra trip round the loop)
        self._thread: WorkerThread | None = None
        self.damaged: dict[str, str] = {}  # name -> reason, for rows failing authentication

    # -- protocol --------------------------------------------------------------------------

    async def open(self) -> None:
        self._thread = await started(f"risoluto-secrets-sqlite:{self.path}", self._open_sync)

    async def list(self) -> list[str]:
        rows = await self._read(lambda c: c.execute("SELECT key FROM encrypted_secrets ORDER BY key").fetchall())
        return [r[0] for r in rows]

    async def get(self, name: str) -> str | None:
        # the keys are taken with the row, on the connection thread: a rotation that commits
        # after the read cannot leave an old-key row to be opened with the new key
        row, keys = await self._read(lambda c: (c.execute(
            "SELECT ciphertext, iv, auth_tag, aad FROM encrypted_secrets WHERE key = ?", (name,)).fetchone(),
            self._keys))
        if row is None:
            return None
        return open_row(keys.key, name, row, self.path)

    async def set(self, name: str, value: str) -> None:
        # sealed here, off the connection thread; the job carries the check of the key it was
        # sealed with, so a rotation queued in between makes it refuse, never mix keys
        keys = self._keys
        s = seal_value(keys.cipher, name, value)
        row = (name, s.ciphertext, s.iv, s.auth_tag)
        await self._worker().run(self._set_sync, row, keys.check)
        self.damaged.pop(name, None)

    def _set_sync(self, row: tuple[str, ...], check: str) -> None:
        """The common case in one statement (one implicit transaction, one trip into SQLite)."""
        conn = self._need_conn()
        try:
            if conn.execute(_GUARDED_UPSERT, (*row, check)).rowcount == 1:
                return
        except sqlite3.OperationalError as exc:
            if _is_full(exc):  # the statement's implicit transaction is rolled back
                self._after_full(conn)
                with self._errors("write"):
                    raise
            # busy (another writer on the file): the statement did nothing; take the slow path
        except sqlite3.DatabaseError:
            with self._errors("write"):
                raise
        # key_check missing or not ours, or busy: the transaction path waits, repairs or refuses
        self._write_sync(lambda c: c.execute(_UPSERT, row), check)

    async def set_many(self, items: dict[str, str]) -> None:
        keys = self._keys
        rows = []
        for name, value in items.items():
            s = seal_value(keys.cipher, name, value)
            rows.append((name, s.ciphertext, s.iv, s.auth_tag))
        # the rowcount, not the cursor: a cursor let go of on the event loop resets its statement
        # from that thread while the connection thread may be using the connection
        await self._worker().run(self._write_sync, lambda c: c.executemany(_UPSERT, rows).rowcount, keys.check)
        for name in items:
            self.damaged.pop(name, None)

    async def delete(self, name: str) -> bool:
        deleted = await self._write(lambda c: c.execute("DELETE FROM encrypted_secrets WHERE key = ?", (name,)).rowcount)
        self.damaged.pop(name, None)
        return bool(deleted > 0)

    async def rotate(self, new_master_key: str) -> None:
        new_key = derive_key(new_master_key)

        def job() -> None:
            self._write_sync(lambda c: self._reencrypt(c, new_key), self._keys.check)
            # swapped on the connection thread, after COMMIT and before any later job runs
            self._keys = _Keys.of(new_key)

        await self._worker().run(job)
        with contextlib.suppress(Exception):  # drop old-key pages from the WAL; best effort
            await self._read(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
            await self._write(self._preallocate_wal)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        thread, self._thread = self._thread, None
        await finished(thread, _close)

    # -- opening ---------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        ensure_private_dir(self.path.parent)
        # create it 0600 ourselves: sqlite would use 0644; its -wal/-shm copy this mode
        ensure_private_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _open_sync(self) -> None:
        conn = self.connect()
        try:
            with self._errors("open"):
                found = self.verify(conn)  # read-only: nothing is written before the key is proven
                self._prepare(conn, found.stored_check)
        except BaseException:
            conn.close()
            raise
        self.damaged = found.damaged
        self._conn = conn

    def verify(self, conn: sqlite3.Connection) -> Verified:
        """Check integrity and the key without writing; WrongMasterKey if nothing decrypts."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        stored_check = None
        if "encrypted_secrets_meta" in tables:
            row = conn.execute("SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check'").fetchone()
            stored_check = row[0] if row else None
        rows: Any = ()
        if "encrypted_secrets" in tables:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(encrypted_secrets)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(" ".join(str(problems[0]).split()))
            columns = {r[1] for r in conn.execute("PRAGMA table_info(encrypted_secrets)")}
            aad = "aad" if "aad" in columns else "0"
            rows = conn.execute(f"SELECT key, ciphertext, iv, auth_tag, {aad} FROM encrypted_secrets")
        return assess(self._keys.key, self._keys.check, rows, stored_check, self.path)

    def _prepare(self, conn: sqlite3.Connection, seen_check: str | None) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SecretStoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")  # deleted ciphertexts are zeroed, not left in free pages
        # a WAL that one large transaction grew past its usual size is cut back at the next reset
        conn.execute(f"PRAGMA journal_size_limit = {self._wal_target(conn)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(encrypted_secrets)")}
            if "aad" not in columns:  # a table made by the original: its rows are legacy
                conn.execute("ALTER TABLE encrypted_secrets ADD COLUMN aad INTEGER NOT NULL DEFAULT 0")
            row = conn.execute("SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check'").fetchone()
            if (row[0] if row else None) != seen_check:
                raise SecretStoreError(f"{self.path} changed while it was being opened; start again")
            if seen_check != self._keys.check:  # first open, or a table last keyed by the original
                conn.execute("INSERT OR REPLACE INTO encrypted_secrets_meta (name, value) VALUES ('key_check', ?)",
                             (self._keys.check,))
            self._preallocate_wal(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _wal_target(self, conn: sqlite3.Connection) -> int:
        """The size the WAL reaches before an automatic checkpoint starts it again from the top."""
        pages = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        return _WAL_HEADER + max(pages, 0) * (_WAL_FRAME_HEADER + page_size)

    def _preallocate_wal(self, conn: sqlite3.Connection) -> None:
        """Zero-fill the WAL up to the size it reaches before a checkpoint; caller holds the write lock.

        Why: SQLite appends to the WAL until a checkpoint, then starts again from the top. On
        ext4 the fsync of a commit that grew the file also commits the new size in the journal,
        one that overwrites does not (about 220 against 130 us on this project's test machine).
        This is what PostgreSQL does with its WAL segments. A zeroed frame is never taken for a
        frame (page number 0 is invalid, the salts differ), as after SQLite's own WAL restart.
        Only bytes past the current end are written, under BEGIN IMMEDIATE, so no frame is
        touched. It is speed, not safety, and never at the cost of the disk: it is skipped when
        it would leave less than ``_PREALLOCATE_HEADROOM`` free, and a failed one (a disk that
        filled meanwhile) is truncated back to the size the WAL had, then logged.
        """
        target = self._wal_target(conn)
        try:  # never created here: the WAL is SQLite's file, with SQLite's mode
            fd = os.open(f"{self.path}-wal", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s-wal: not preallocated (%s)", self.path, exc.strerror or exc)
            return
        try:
            size = os.fstat(fd).st_size
            if size >= target:
                return
            vfs = os.fstatvfs(fd)
            free = (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) * vfs.f_frsize
            if free - (target - size) < _PREALLOCATE_HEADROOM:
                log.info("%s-wal: not preallocated (%d bytes free); commits that grow it are slower",
                         self.path, free)
                return
            zeros = memoryview(bytes(target - size))
            try:
                while zeros:
                    zeros = zeros[os.pwrite(fd, zeros, target - len(zeros)):]
                os.fdatasync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)  # give the space back: a shrink never needs any
                log.warning("%s-wal: preallocation failed (%s); rolled back to %d bytes", self.path,
                            exc.strerror or exc, size)
        except OSError as exc:
            log.warning("%s-wal: preallocation skipped (%s)", self.path, exc.strerror or exc)
        finally:
            os.close(fd)

    def _after_full(self, conn: sqlite3.Connection) -> None:
        """A write failed on a full disk (its transaction is rolled back): try to give the WAL's
        space back (a TRUNCATE checkpoint) and say so, without any value."""
        wal = f"{self.path}-wal"
        before = _size(wal)
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        log.error("%s: the disk is full; the write was rolled back (WAL %d -> %d bytes)", self.path, before,
                  _size(wal))

    # -- reads and writes ------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Any:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise StorageFull(f"{self.path}: {what} failed: the disk is full; nothing was changed") from None
            if "locked" in str(exc) or "busy" in str(exc):
                raise SecretStoreError(f"{self.path} is locked by another process ({what}); try again") from None
            raise SecretStoreError(f"{self.path}: {what} failed: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise SecretStoreError(
                f"{self.path} cannot be read as an SQLite database ({exc}); it is corrupted: restore it "
                "from a backup. Nothing was changed."
            ) from None

    def _need_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SecretStoreError("the sqlite secret store is not open")
        return self._conn

    def _worker(self) -> WorkerThread:
        if self._thread is None:
            raise SecretStoreError("the sqlite secret store is not open")
        return self._thread

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            with self._errors("read"):
                return fn(self._need_conn())

        return await self._worker().run(run)

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self._worker().run(lambda: self._write_sync(fn, self._keys.check))  # check read in the thread

    def _write_sync(self, fn: Callable[[sqlite3.Connection], Any], check: str) -> Any:
        with self._errors("write"):
            conn = self._need_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._check_key(conn, check)
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_full(exc):
                    self._after_full(conn)
                raise
            return result

    def _check_key(self, conn: sqlite3.Connection, check: str) -> None:
        row = conn.execute("SELECT value FROM encrypted_secrets_meta WHERE name = 'key_check'").fetchone()
        if row is not None and row[0] != check:
            raise SecretStoreError(
                f"{self.path} was re-keyed (rotate-key) while this write was pending or by another process; "
                "retry, or restart with the new master key. Nothing was changed."
            )
        if row is None:
            conn.execute("INSERT INTO encrypted_secrets_meta (name, value) VALUES ('key_check', ?)", (check,))

    def _reencrypt(self, conn: sqlite3.Connection, new_key: bytes) -> None:
        """Every row under ``new_key`` (bound to its name), inside the caller's transaction."""
        rows = conn.execute("SELECT key, ciphertext, iv, auth_tag, aad FROM encrypted_secrets").fetchall()
        plain: dict[str, str] = {}
        bad: list[str] = []
        for name, ct, iv, tag, bound in rows:
            try:
                plain[name] = open_value(self._keys.key, name, Sealed(iv=iv, auth_tag=tag, ciphertext=ct),
                                         bool(bound))[0]
            except (DecryptError, FormatError):
                bad.append(name)
        if bad:
            raise SecretIntegrityError(
                f"rotation aborted: {len(bad)} secret(s) fail authentication ({', '.join(sorted(bad)[:10])}); "
                "re-set or delete them first. Nothing was changed."
            )
        updates = []
        for name, value in plain.items():
            s = seal_value(new_key, name, value)
            updates.append((s.ciphertext, s.iv, s.auth_tag, name))
        conn.executemany(
            f"UPDATE encrypted_secrets SET ciphertext = ?, iv = ?, auth_tag = ?, updated_at = {_NOW}, aad = 1 WHERE key = ?",
            updates,
        )
        conn.execute("UPDATE encrypted_secrets_meta SET value = ? WHERE name = 'key_check'", (key_check(new_key),))


def _is_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL: "database or disk is full" (the extended code keeps the primary in its low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return "disk is full" in str(exc)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


@hookimpl
def risoluto_secret_store(settings: Settings, master_key: str) -> SqliteStore | None:
    if settings.secrets.backend == "sqlite":
        return SqliteStore(settings, master_key)
    return None


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    """Key match, damaged and legacy rows, read-only."""
    settings = kernel.settings
    if settings.secrets.backend != "sqlite":
        return []

    item = "credential encryption: store"
    key, report = key_for_check(settings, item)
    if key is None:
        return report
    store = SqliteStore(settings, key)
    if not store.path.exists():
        return [CheckResult(item=item, status=PASS, reason=f"sqlite backend: no {DB_NAME} yet")]
    conn = sqlite3.connect(store.path, timeout=5.0)
    try:
        with store._errors("check"):
            found = store.verify(conn)
    except SecretStoreError as exc:
        return [CheckResult(item=item, status=FAIL, reason=str(exc),
                            fix="start with the key that wrote the data, or restore the database from a backup")]
    finally:
        conn.close()
    if found.damaged:
        names = ", ".join(sorted(found.damaged)[:10])
        return [CheckResult(item=item, status=FAIL,
                            reason=f"{len(found.damaged)} secret(s) fail authentication (tampered or moved): {names}",
                            fix="re-set them (`risoluto secrets set NAME`) or delete them; restore from a backup")]
    if found.legacy:
        return [CheckResult(item=item, status=WARN,
                            reason=f"{found.legacy} row(s) written by the original are not bound to their names",
                            fix="run `risoluto secrets rotate-key` (or re-set them) to upgrade every row")]
    return [CheckResult(item=item, status=PASS,
                        reason=f"sqlite backend, AES-256-GCM, {found.rows} row(s) bound to their names, key matches")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    # any loaded backend; a secrets.backend no plugin provides stops the start (secrets service)
    return ["secret store"]
