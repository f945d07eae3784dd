"""``audited``/``announce`` around every change to the secret store (the API and the CLI). The
store itself is opened by the kernel (``risoluto.secret_store.open_store``, shared with the CLI).
A private library of the secrets plugins (no hooks).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio

from risoluto.hookspecs.secrets import AuditUnavailable, SecretEvent, SecretStoreError

if TYPE_CHECKING:
    from risoluto.hooks import Hooks
    from risoluto.settings import Settings

log = logging.getLogger("risoluto.secrets")


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
