"""Secret routes (docs/secrets.md; the original's API): list names, set, delete. Values are never returned.

``GET /api/v1/secrets`` -> ``{"keys": [sorted]}``; ``POST``/``PUT /api/v1/secrets/<key>``
with ``{"value": "<non-empty string>"}`` -> 204; ``DELETE`` -> 204 or 404
``secret_not_found``. Locked store -> 503 ``secrets_locked``. Names must match
``^[A-Za-z0-9_.:-]{1,256}$`` (400 ``invalid_secret_key``: the route takes any path so a
``/`` in a name gets that answer, not a 404); values are non-empty strings of at most
64 KiB of UTF-8 (400 ``invalid_secret_value``; a body over the kernel's 1 MiB limit is
413 ``payload_too_large`` before it gets here). Authorization is the write guard's job.
Every set and delete is recorded in ``secrets.audit.log`` BEFORE it is made (see
``audit_log``): a change whose record cannot be written is never made. A full disk (store or
audit log) is 507 ``insufficient_storage``, an audit log that cannot be written for another
reason 503 ``audit_unavailable``; both mean nothing was changed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from quart import Blueprint, g

from risoluto.errors import ApiError
from risoluto.hookspecs import hookimpl
from risoluto.fsutil import is_full
from risoluto.hookspecs.secrets import (
    AuditUnavailable, SecretEvent, SecretStore, SecretStoreError, StorageFull,
)
from risoluto.openapi import api
from risoluto.requests import json_object
from risoluto.shielded import to_the_end

from ._access import audited
from ._names import check_name, check_value

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

log = logging.getLogger("risoluto.secrets")
_ERROR = {"$ref": "#/components/schemas/Error"}
_KEYS = {
    "type": "object", "required": ["keys"], "additionalProperties": False,
    "properties": {"keys": {"type": "array", "items": {"type": "string"}}},
}
# Other members of the body are ignored, so they are not forbidden here either.
_VALUE = {"type": "object", "required": ["value"],
          "properties": {"value": {"type": "string", "minLength": 1, "description": "at most 64 KiB of UTF-8"}}}


def _checked_name(key: str) -> None:
    """A name from the URL, or 400 ``invalid_secret_key``."""
    try:
        check_name(key)
    except ValueError as exc:
        raise ApiError(400, "invalid_secret_key", str(exc)) from None


def _store(kernel: Kernel) -> SecretStore:
    secrets = kernel.backends.secrets
    if secrets.store is None:
        raise ApiError(503, "secrets_locked", f"Secrets are locked ({secrets.locked_reason}).")
    return secrets.store


@contextlib.asynccontextmanager
async def _store_errors() -> AsyncIterator[None]:
    """A failing store is a 503 with a generic sentence; the detail goes to the log only."""
    try:
        yield
    except (StorageFull, OSError) as exc:
        if not isinstance(exc, StorageFull) and not is_full(exc):
            log.error("secret store failure: %s", exc)
            raise _unavailable() from None
        log.error("secret store: disk full: %s", exc)
        raise ApiError(507, "insufficient_storage",
                       "The disk holding the secret store or its audit log is full; nothing was changed. "
                       "Free space there and retry.") from None
    except AuditUnavailable as exc:
        log.error("secret audit log: %s", exc)
        raise ApiError(503, "audit_unavailable",
                       "The change was not made: its audit record could not be written. "
                       "Run `risoluto doctor`.") from None
    except SecretStoreError as exc:
        log.error("secret store failure: %s", exc)
        raise _unavailable() from None


def _unavailable() -> ApiError:
    return ApiError(503, "secret_store_unavailable",
                    "The secret store could not complete the operation; nothing was changed.")


def _event(kernel: Kernel, operation: str, key: str) -> SecretEvent:
    info = g.get("info")
    store = kernel.backends.secrets.store
    return SecretEvent(
        operation=operation, key=key, backend=getattr(store, "backend", kernel.settings.secrets.backend),
        principal=getattr(info, "principal", "") or "", remote=getattr(info, "client", "") or "",
    )


@hookimpl
def risoluto_app_blueprints(kernel: Kernel) -> list[Any]:
    bp = Blueprint("risoluto_secrets", __name__)

    @bp.get("/api/v1/secrets")
    @api("Names of the stored secrets, sorted (values are never returned)", tags=("secrets",),
         responses={200: _KEYS, 503: _ERROR})
    async def list_secrets() -> Any:
        store = _store(kernel)
        async with _store_errors():
            names = await store.list()
        return {"keys": sorted(names)}

    @bp.route("/api/v1/secrets/<path:key>", methods=["POST", "PUT"])
    @api("Set a secret (encrypted at rest, audited)", tags=("secrets",), request=_VALUE,
         responses={204: None, 400: _ERROR, 503: _ERROR, 507: _ERROR})
    async def set_secret(key: str) -> Any:
        store = _store(kernel)
        _checked_name(key)
        body = await json_object()
        try:
            value = check_value(body.get("value"))
        except ValueError as exc:
            raise ApiError(400, "invalid_secret_value", str(exc)) from None
        event = _event(kernel, "set", key)

        async def change() -> bool:
            await store.set(key, value)
            return True

        async def commit_and_audit() -> None:
            async with _store_errors():
                await audited(kernel.hooks, kernel.settings, event, store, change)

        await to_the_end(commit_and_audit())  # a client that leaves never skips the audit line
        return "", 204

    @bp.delete("/api/v1/secrets/<path:key>")
    @api("Delete a secret (audited)", tags=("secrets",),
         responses={204: None, 400: _ERROR, 404: _ERROR, 503: _ERROR, 507: _ERROR})
    async def delete_secret(key: str) -> Any:
        store = _store(kernel)
        _checked_name(key)
        event = _event(kernel, "delete", key)

        async def commit_and_audit() -> bool:
            async with _store_errors():
                return await audited(kernel.hooks, kernel.settings, event, store, lambda: store.delete(key))

        if not await to_the_end(commit_and_audit()):
            raise ApiError(404, "secret_not_found", "No secret has that name.")
        return "", 204

    return [bp]
