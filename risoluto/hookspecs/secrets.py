"""Encrypted secret storage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..settings import Settings


class SecretStoreError(Exception):
    """A store failure whose message is safe to show (never contains a value)."""


class WrongMasterKey(SecretStoreError):
    """Existing data does not decrypt with the configured master key."""


class SecretIntegrityError(SecretStoreError):
    """One stored secret fails authentication (tampered, or moved under another name)."""


class StorageFull(SecretStoreError):
    """The disk (or quota) holding the store or its audit trail is full; nothing was changed."""


class AuditUnavailable(SecretStoreError):
    """A change's audit record could not be written, so the change was not made."""


class SecretStore(Protocol):
    """An encrypted secret store. Mutations are serialized, atomic and durable.

    Building the object does no I/O; ``open()`` does. Every error is a
    :class:`SecretStoreError` (or ``OSError`` from the disk) whose message never contains a
    value. A failed mutation leaves the store as it was.
    """

    backend: str
    """Backend name, as in ``secrets.backend`` (metrics, audit, doctor)."""

    location: str
    """Where the data lives (a path or a URL without credentials), for messages."""

    async def open(self) -> None:
        """Load and verify existing data; raise WrongMasterKey if it does not decrypt.

        Must not write anything before the key is verified.
        """

    async def list(self) -> list[str]: ...

    async def get(self, name: str) -> str | None:
        """The value, None if absent; SecretIntegrityError if it fails authentication."""

    async def set(self, name: str, value: str) -> None: ...

    async def set_many(self, items: dict[str, str]) -> None:
        """Set every item in one atomic step (all or nothing): ``secrets migrate``."""

    async def delete(self, name: str) -> bool:
        """Remove ``name``; False if it did not exist."""

    async def rotate(self, new_master_key: str) -> None:
        """Re-encrypt everything under a new key in one atomic step."""

    async def close(self) -> None: ...


@attrs.frozen(kw_only=True)
class SecretEvent:
    """A change to the store. Never carries a value."""

    operation: str  # "set" | "delete" | "rotate" | "migrate"
    key: str
    backend: str
    principal: str = ""
    remote: str = ""


@hookspec(firstresult=True)
def risoluto_secret_store(kernel: Kernel, settings: Settings, master_key: str) -> SecretStore | None:
    """Return the store for ``secrets.backend``, or None if it is not yours.

    Called at startup when a master key is available (from ``MASTER_KEY`` or
    ``<DATA_DIR>/master.key``); firstresult. The kernel then awaits ``open()``, holds the store
    as ``kernel.backends.secrets.store`` and closes it at shutdown. Without a
    master key this hook is not called and secret routes answer 503 ``secrets_locked``.
    ``risoluto secrets`` (CLI) and the doctor call it too: building the store must do no
    I/O. No plugin returning a store for ``secrets.backend`` is a startup error naming it.

    Example::

        @hookimpl
        def risoluto_secret_store(settings, master_key):
            if settings.secrets.backend == "vault":
                return VaultStore(settings, master_key)
            return None
    """


@hookspec
def risoluto_secret_changing(kernel: Kernel, event: SecretEvent, settings: Settings) -> Callable[[bool], None] | None:
    """Record a secret ``set`` or ``delete`` BEFORE it is made (a write-ahead audit).

    Collected; called off the event loop, one change at a time per process. Raise
    :class:`StorageFull` or :class:`AuditUnavailable` to refuse the change: it is then not
    made and the client gets 507 ``insufficient_storage`` or 503 ``audit_unavailable``, so
    no change is ever acknowledged without its record. Return a callable, or None: it is
    called with True once the change is durable, with False if the change failed or changed
    nothing (a delete of a missing name), so the record can be taken back. The built-in
    ``secrets.audit_log`` appends its line here and truncates it away on False.

    Example::

        @hookimpl
        def risoluto_secret_changing(event, settings):
            ticket = journal.begin(event.operation, event.key)
            return lambda done: journal.finish(ticket, done)
    """


@hookspec
def risoluto_secret_changed(kernel: Kernel, event: SecretEvent, settings: Settings) -> None:
    """Observe a secret being set, deleted or the store being rotated (audit).

    Called after the change is durable; collected. Must not raise. A record that must
    exist before a set or delete is acknowledged belongs in ``risoluto_secret_changing``.

    Example::

        @hookimpl
        def risoluto_secret_changed(event, settings):
            log.info("secret %s %s", event.operation, event.key)
    """
