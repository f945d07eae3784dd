"""The ``webhook_inbox`` table in ``<DATA_DIR>/risoluto.db`` (SPEC 2.3).

One row per verified delivery, unique per (provider, delivery id) and also per
(provider, SHA-256 of the body): the delivery-id headers are not signed, so a captured
body replayed under a fresh id is still a duplicate. SQLite runs in worker threads
(``anyio.to_thread``) on one connection guarded by a lock; WAL journal, synchronous=FULL
so an acknowledged delivery survives a crash.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import anyio

from risoluto.fsutil import ensure_private_dir

DB_NAME = "risoluto.db"
_COLUMNS = {
    "provider": "TEXT NOT NULL DEFAULT ''",
    "delivery_id": "TEXT NOT NULL DEFAULT ''",
    "event": "TEXT NOT NULL DEFAULT ''",
    "body_sha256": "TEXT",
    "payload": "BLOB",
    "received_at": "TEXT NOT NULL DEFAULT ''",
}


class Inbox:
    def __init__(self, data_dir: Path):
        self.path = data_dir / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> None:
        ensure_private_dir(self.path.parent)
        fresh = not self.path.exists()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            if fresh:
                self.path.chmod(0o600)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS webhook_inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                + ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items()) + ")"
            )
            # a table made by another version may lack columns: add them, never drop anything
            have = {row[1] for row in conn.execute("PRAGMA table_info(webhook_inbox)")}
            for name, kind in _COLUMNS.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE webhook_inbox ADD COLUMN {name} {kind}")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS webhook_inbox_delivery "
                         "ON webhook_inbox (provider, delivery_id)")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS webhook_inbox_body "
                         "ON webhook_inbox (provider, body_sha256)")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def record(self, provider: str, delivery_id: str, event: str, body: bytes, received_at: str) -> bool:
        """Store a verified delivery; False if it was already there (a duplicate)."""
        digest = hashlib.sha256(body).hexdigest()
        return await anyio.to_thread.run_sync(self._record_sync, provider, delivery_id, event, digest, body,
                                              received_at)

    def _record_sync(self, provider: str, delivery_id: str, event: str, digest: str, body: bytes,
                     received_at: str) -> bool:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("webhook inbox is closed")
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO webhook_inbox (provider, delivery_id, event, body_sha256, payload, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (provider, delivery_id, event, digest, body, received_at),
            )
            return cur.rowcount == 1

    async def count(self, provider: str) -> int:
        def run() -> int:
            with self._lock:
                assert self._conn is not None
                return int(self._conn.execute("SELECT COUNT(*) FROM webhook_inbox WHERE provider = ?",
                                              (provider,)).fetchone()[0])

        return await anyio.to_thread.run_sync(run)

    async def close(self) -> None:
        def run() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(run)
