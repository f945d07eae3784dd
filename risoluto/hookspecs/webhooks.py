"""Signed inbound webhooks."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import attrs

from ..errors import ApiError
from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..settings import Settings


@attrs.frozen(kw_only=True)
class WebhookDelivery:
    provider: str
    delivery_id: str
    event: str
    payload: Any
    received_at: str


SecretReader = Callable[[str], Awaitable["str | None"]]
"""``await secret(name)``: a signing secret read from the secret store at request time
(None when unset). Raises ApiError 503 ``webhook_not_configured`` when the store is locked."""


class WebhookProvider(Protocol):
    """Verifies one provider's deliveries at ``POST /webhooks/<name>``.

    ``name`` must match ``^[a-z0-9][a-z0-9_-]{0,63}$``. ``verify`` gets the exact received
    bytes, the headers and a :data:`SecretReader`; it returns ``(delivery_id, event,
    payload)`` or raises :class:`~risoluto.errors.ApiError` with the codes of docs/http-security.md ("Webhooks"), in
    this order: 503 ``webhook_not_configured``, 401 ``signature_missing``, 401
    ``signature_invalid``, 400 ``invalid_payload``, 401 ``replay_rejected``, 400
    ``delivery_missing``. The kernel then dedups the delivery id in ``webhook_inbox``.
    """

    name: str

    async def verify(self, body: bytes, headers: Any, secret: SecretReader) -> tuple[str, str, Any]: ...


async def signing_secrets(secret: SecretReader, name: str) -> list[bytes]:
    """The secret ``name`` and its rotation predecessor ``<name>_PREVIOUS``, as bytes.

    Raises 503 ``webhook_not_configured`` when neither is set.
    """
    found = [value for value in (await secret(name), await secret(f"{name}_PREVIOUS")) if value]
    if not found:
        raise ApiError(503, "webhook_not_configured", f"This webhook is not configured: set the secret {name}.")
    return [value.encode("utf-8") for value in found]


def hmac_sha256_matches(body: bytes, keys: list[bytes], given_hex: str) -> bool:
    """True if ``given_hex`` is the HMAC-SHA256 of ``body`` under one of ``keys``.

    Compares bytes in constant time, tries every key whatever the outcome, and never
    raises on odd input (non-hex, non-ASCII, any length).
    """
    given = given_hex.strip().lower().encode("latin-1", "replace")
    results = [hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest().encode(), given) for key in keys]
    return any(results)


@hookspec
def risoluto_webhook_providers(kernel: Kernel, settings: Settings) -> list[WebhookProvider]:
    """Contribute webhook providers. Called once at app creation; collected.

    Example::

        @hookimpl
        def risoluto_webhook_providers(settings):
            return [StandardWebhooks()]
    """


@hookspec
def risoluto_webhook_received(kernel: Kernel, delivery: WebhookDelivery) -> None:
    """A verified, first-seen delivery; collected. At least once per delivery id: a server
    killed between storing a delivery and handing it on hands it on at its next start (or at
    the sender's retry), and one killed just after handing it on may hand it on again, so
    deduplicate by ``(provider, delivery_id)``.

    Example::

        @hookimpl
        def risoluto_webhook_received(delivery):
            queue.put_nowait(delivery)
    """
