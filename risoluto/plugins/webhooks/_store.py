"""The ``webhook_inbox`` table in ``<DATA_DIR>/risoluto.db`` (docs/http-security.md, "Webhooks").

One row per verified delivery, unique per (provider, delivery id) and also per
(provider, SHA-256 of the body): the delivery-id headers are not signed, so a captured
body replayed under a fresh id is still a duplicate. The connection lives on its own thread
(``risoluto.worker_thread``), which runs its queries one at a time; WAL journal,
synchronous=FULL so an acknowledged delivery survives a crash. It used anyio's shared threads
with a lock: while another process held the database's write lock, 45 deliveries took all 40
of them, each waiting out the busy timeout, and unrelated requests waited behind them.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import NamedTuple

from risoluto.fsutil import ensure_private_dir, ensure_private_file
from risoluto.worker_thread import WorkerThread, finished, started

DB_NAME = "risoluto.db"


class StoredDelivery(NamedTuple):
    provider: str
    delivery_id: str
    event: str
    body: bytes
    received_at: str


_COLUMNS = {
    "provider": "TEXT NOT NULL DEFAULT ''",
    "delivery_id": "TEXT NOT NULL DEFAULT ''",
    "event": "TEXT NOT NULL DEFAULT ''",
    "body_sha256": "TEXT",
    "payload": "BLOB",
    "received_at": "TEXT NOT NULL DEFAULT ''",
    # 0 from the INSERT until the delivery has been handed to the consumers; rows made before
    # this column existed count as handed on (their fate is unknown: not replayed at upgrade)
    "handed_on": "INTEGER NOT NULL DEFAULT 1",
}


class Inbox:
    def __init__(self, data_dir: Path):
        self.path = data_dir / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._thread: WorkerThread | None = None

    def _worker(self) -> WorkerThread:
        if self._thread is None:
            raise RuntimeError("webhook inbox is closed")
        return self._thread

    async def open(self) -> None:
        self._thread = await started(f"risoluto-webhook-inbox:{self.path}", self._open_sync)

    def _open_sync(self) -> None:
        ensure_private_dir(self.path.parent)
        ensure_private_file(self.path)  # sqlite would make it 0644 (its -wal/-shm copy this mode)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
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
            # what not_handed_on() reads on every duplicate: only the few unmarked rows, not the
            # whole (never pruned) table
            conn.execute("CREATE INDEX IF NOT EXISTS webhook_inbox_not_handed_on "
                         "ON webhook_inbox (handed_on) WHERE handed_on = 0")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def record(self, provider: str, delivery_id: str, event: str, body: bytes, received_at: str) -> bool:
        """Store a verified delivery; False if it was already there (a duplicate)."""
        digest = hashlib.sha256(body).hexdigest()
        return bool(await self._worker().run(self._record_sync, provider, delivery_id, event, digest, body,
                                             received_at))

    def _record_sync(self, provider: str, delivery_id: str, event: str, digest: str, body: bytes,
                     received_at: str) -> bool:
        if self._conn is None:
            raise RuntimeError("webhook inbox is closed")
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO webhook_inbox (provider, delivery_id, event, body_sha256, payload, received_at,"
            " handed_on) VALUES (?, ?, ?, ?, ?, ?, 0)",
            (provider, delivery_id, event, digest, body, received_at),
        )
        return cur.rowcount == 1

    async def mark_handed_on(self, provider: str, delivery_id: str) -> None:
        def run() -> None:
            assert self._conn is not None
            self._conn.execute("UPDATE webhook_inbox SET handed_on = 1 WHERE provider = ? AND delivery_id = ?",
                               (provider, delivery_id))

        await self._worker().run(run)

    async def not_handed_on(self, provider: str | None = None) -> list[StoredDelivery]:
        """Stored deliveries not yet marked as handed on, oldest first (``provider``: only its)."""
        def run() -> list[StoredDelivery]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT provider, delivery_id, event, payload, received_at FROM webhook_inbox"
                " WHERE handed_on = 0 AND (? IS NULL OR provider = ?) ORDER BY rowid",  # older tables have no id
                (provider, provider)).fetchall()
            return [StoredDelivery(*row) for row in rows]

        return list(await self._worker().run(run))

    async def count(self, provider: str) -> int:
        def run() -> int:
            assert self._conn is not None
            return int(self._conn.execute("SELECT COUNT(*) FROM webhook_inbox WHERE provider = ?",
                                          (provider,)).fetchone()[0])

        return int(await self._worker().run(run))

    async def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        thread, self._thread = self._thread, None
        await finished(thread, run)
