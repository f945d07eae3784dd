"""The async components plugins hand out are anyio code: they also run under trio (pytest-trio).

Quart itself runs on asyncio; these tests keep the stores and the limiter free of asyncio-only calls,
so an embedder on trio (or a future Quart-Trio app) can use them.
"""

import pytest
import trio

from risoluto.plugins.http.rate_limit import MemoryLimiter
from risoluto.plugins.secrets.file_store import FileStore
from risoluto.plugins.secrets.sqlite_store import SqliteStore
from risoluto.settings import build_settings


@pytest.mark.trio
async def test_memory_limiter_under_trio():
    limiter = MemoryLimiter(max_clients=100)
    results = []

    async def one():
        results.append((await limiter.hit("api", "192.0.2.7", 5, 60.0)).allowed)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert results.count(True) == 5 and results.count(False) == 3
    await limiter.close()


@pytest.mark.trio
@pytest.mark.parametrize("store_cls", [FileStore, SqliteStore])
async def test_secret_stores_under_trio(tmp_path, store_cls):
    settings = build_settings({}, None, {"DATA_DIR": str(tmp_path)})
    store = store_cls(settings, "trio-master-key")
    await store.open()
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(store.set, f"K{i}", f"v{i}")
    assert await store.list() == sorted(f"K{i}" for i in range(10))
    await store.close()
    again = store_cls(settings, "trio-master-key")
    await again.open()
    assert await again.get("K7") == "v7"
    await again.close()
