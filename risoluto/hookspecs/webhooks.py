"""Signed inbound webhooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..settings import Settings


@attrs.frozen(kw_only=True)
class WebhookDelivery:
    provider: str
    delivery_id: str
    event: str
    payload: Any
    received_at: str


class WebhookProvider(Protocol):
    """Verifies one provider's deliveries at ``POST /webhooks/<name>``.

    ``verify`` gets the exact received bytes, the headers and a way to read signing
    secrets from the secret store; it returns ``(delivery_id, event, payload)`` or raises
    :class:`~risoluto.errors.ApiError` with the provider's code.
    """

    name: str

    async def verify(self, body: bytes, headers: Any, secret: Any) -> tuple[str, str, Any]: ...


@hookspec
def risoluto_webhook_providers(settings: Settings) -> list[WebhookProvider]:
    """Contribute webhook providers. Called once at app creation; collected.

    Example::

        @hookimpl
        def risoluto_webhook_providers(settings):
            return [StandardWebhooks()]
    """


@hookspec
def risoluto_webhook_received(delivery: WebhookDelivery) -> None:
    """A verified, first-seen delivery. Called once per delivery id; collected.

    Example::

        @hookimpl
        def risoluto_webhook_received(delivery):
            queue.put_nowait(delivery)
    """
