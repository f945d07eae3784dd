"""Open the secret store and count what is asked of it (a kernel library: the kernel's backend
start, ``risoluto.backends``, and the secrets CLI share it; docs/secrets.md).

key (``risoluto.keys.resolve_master_key``) -> store (the ``risoluto_secret_store`` hook, asked
through ``risoluto.backends.select``) -> ``await store.open()``. No key: no store, and secret
routes answer 503 ``secrets_locked``. A key that does not open the existing data: StartupError
naming the data and the key's source; nothing is written. The kernel wraps the opened store in
a :class:`CountingStore` (one counter per app, labelled by operation, backend and outcome;
never by key name: a label per name would let a client grow the registry without bound).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from prometheus_client import Counter

from .errors import StartupError
from .hookspecs.secrets import SecretStore, SecretStoreError, WrongMasterKey
from .keys import MasterKey, commit_new_key, pending_path, read_key_file, resolve_master_key

if TYPE_CHECKING:
    from .hooks import Hooks
    from .settings import Settings

log = logging.getLogger("risoluto.secrets")
METRIC = "risoluto_secret_operations"


@attrs.frozen
class OpenedStore:
    store: SecretStore
    master_key: MasterKey


def build_store(settings: Settings, hooks: Hooks, master_key: str) -> SecretStore:
    """The store ``secrets.backend`` names (no I/O); StartupError naming the setting if no plugin
    provides it."""
    from .backends import SECRETS, select

    store: SecretStore = select(hooks, SECRETS, settings, master_key)
    return store


async def open_store(settings: Settings, hooks: Hooks, *, allow_unprintable_key: bool = False) -> OpenedStore | None:
    """The opened store for the configured key and backend; None without a key.
    ``allow_unprintable_key``: see ``resolve_master_key`` (``rotate-key`` only)."""
    mk = resolve_master_key(settings, allow_unprintable=allow_unprintable_key)
    if mk is None:
        return None
    store = build_store(settings, hooks, mk.value)
    try:
        await _open(store)
    except WrongMasterKey as exc:
        finished = await _finish_interrupted_rotation(settings, hooks, mk)
        if finished is not None:
            return finished
        raise StartupError(
            f"{exc} The master key comes from {mk.source}; if you just rotated it, use the new key."
        ) from None
    return OpenedStore(store, mk)


async def _open(store: SecretStore) -> None:
    try:
        await store.open()
    except WrongMasterKey:
        raise
    except SecretStoreError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"secret store {store.location}: {exc.strerror or exc}") from None


async def _finish_interrupted_rotation(settings: Settings, hooks: Hooks, mk: MasterKey) -> OpenedStore | None:
    """Data under master.key.new after a crash between re-encryption and the final rename."""
    if mk.path is None:
        return None
    try:
        new_value = read_key_file(pending_path(settings))
    except StartupError:
        return None
    if new_value is None:
        return None
    store = build_store(settings, hooks, new_value)
    try:
        await _open(store)
    except WrongMasterKey:
        return None
    await anyio.to_thread.run_sync(commit_new_key, settings)
    log.warning("finished an interrupted key rotation: %s now holds the new key", mk.path)
    return OpenedStore(store, MasterKey(new_value, str(mk.path), mk.path))


def operations_counter(registry: Any) -> Counter:
    return Counter(METRIC, "Secret store operations by operation, backend and outcome.",
                   ["operation", "backend", "outcome"], registry=registry)


class CountingStore:
    """Delegates to ``store``; counts list/get/set/set_many/delete/rotate."""

    def __init__(self, store: SecretStore, counter: Counter):
        self._store = store
        self._counter = counter

    def __getattr__(self, name: str) -> Any:  # backend, location, damaged, ...
        return getattr(self._store, name)

    async def _call(self, operation: str, *args: Any) -> Any:
        outcome = "error"
        try:
            result = await getattr(self._store, operation)(*args)
            outcome = "ok"
            return result
        finally:
            self._counter.labels(operation, self._store.backend, outcome).inc()

    async def open(self) -> None:
        await self._store.open()

    async def close(self) -> None:
        await self._store.close()

    async def list(self) -> list[str]:
        return await self._call("list")

    async def get(self, name: str) -> str | None:
        return await self._call("get", name)

    async def set(self, name: str, value: str) -> None:
        await self._call("set", name, value)

    async def set_many(self, items: dict[str, str]) -> None:
        await self._call("set_many", items)

    async def delete(self, name: str) -> bool:
        return await self._call("delete", name)

    async def rotate(self, new_master_key: str) -> None:
        await self._call("rotate", new_master_key)
