"""Open the secret store: ``open_store`` (the ``secrets.service`` plugin at startup, the secrets
CLI), and ``audited``/``announce`` around every change (the API and the CLI).

key (``risoluto.keys.resolve_master_key``) -> store (``risoluto_secret_store`` hook, by
``secrets.backend``) -> ``await store.open()``. No key: no store, and secret routes answer 503
``secrets_locked``. A key that does not open the existing data: StartupError naming the data and
the key's source; nothing is written. A private library of the secrets plugins (no hooks).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
import attrs

from risoluto.errors import StartupError
from risoluto.hookspecs.secrets import AuditUnavailable, SecretEvent, SecretStore, SecretStoreError, WrongMasterKey

from risoluto.keys import BUILTIN_BACKENDS, MasterKey, commit_new_key, pending_path, read_key_file, resolve_master_key

if TYPE_CHECKING:
    from risoluto.hooks import Hooks
    from risoluto.settings import Settings

log = logging.getLogger("risoluto.secrets")


@attrs.frozen
class OpenedStore:
    store: SecretStore
    master_key: MasterKey


def build_store(settings: Settings, hooks: Hooks, master_key: str) -> SecretStore:
    store = hooks.secret_store(settings, master_key)
    if store is None:
        raise StartupError(
            f"secrets.backend: unknown backend {settings.secrets.backend!r}: no plugin provides it "
            f"(built in: {', '.join(BUILTIN_BACKENDS)})"
        )
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


# One audited change at a time per store in this process: the write-ahead records hold their
# file lock until the change is finished, and a queue here keeps that wait off worker threads.
_serial: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()


async def audited(hooks: Hooks, settings: Settings, event: SecretEvent, store: Any,
                  change: Callable[[], Awaitable[bool]]) -> bool:
    """Make ``change`` (True when it changed something) with its write-ahead records.

    ``risoluto_secret_changing`` records first (the audit line is durable before the store is
    touched); a refusal there (StorageFull, AuditUnavailable) means the change is never made.
    Then the change; its finishers hear whether it is durable, so a failed change, or a delete
    of a missing name, takes its record back. Then ``risoluto_secret_changed`` observers.
    """
    lock = _serial.setdefault(store, anyio.Lock())
    async with lock:
        finishers = await anyio.to_thread.run_sync(_records_ahead, hooks, settings, event)
        changed = False
        try:
            changed = await change()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_finish, finishers, changed, event)
    if changed:
        await announce(hooks, settings, event)
    return changed


def _records_ahead(hooks: Hooks, settings: Settings, event: SecretEvent) -> list[Callable[[bool], None]]:
    try:
        return hooks.secret_changing(event, settings)
    except SecretStoreError:
        raise
    except Exception as exc:  # a third-party recorder that failed: refuse, as its record is missing
        log.error("a risoluto_secret_changing recorder failed (operation %s): %s", event.operation,
                  type(exc).__name__)
        raise AuditUnavailable("an audit recorder failed; nothing was changed") from None


def _finish(finishers: list[Callable[[bool], None]], changed: bool, event: SecretEvent) -> None:
    for finish in finishers:
        try:
            finish(changed)
        except Exception:
            log.exception("a risoluto_secret_changing finisher failed (operation %s, change %s)",
                          event.operation, "kept" if changed else "not made")


async def announce(hooks: Hooks, settings: Settings, event: SecretEvent) -> None:
    """Emit ``risoluto_secret_changed`` (audit) off the event loop; an observer never fails a write."""
    try:
        await anyio.to_thread.run_sync(functools.partial(hooks.secret_changed, event, settings))
    except Exception:
        log.exception("a risoluto_secret_changed observer failed (operation %s)", event.operation)
