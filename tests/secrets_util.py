"""Shared by the secret store tests: what a new process finds on disk."""

from __future__ import annotations

from typing import Any

from risoluto.plugins.secrets.file_store import FileStore
from risoluto.plugins.secrets.sqlite_store import SqliteStore


async def stored_values(settings: Any, backend: str, key: str) -> dict[str, str]:
    """Every secret as a fresh store of ``backend`` opened with ``key`` reads it."""
    store = (FileStore if backend == "file" else SqliteStore)(settings, key)
    await store.open()
    try:
        return {name: await store.get(name) for name in await store.list()}
    finally:
        await store.close()
