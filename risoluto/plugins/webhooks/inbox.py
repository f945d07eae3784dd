"""Webhook receiver (docs/http-security.md, "Webhooks"): ``POST /webhooks/<provider>`` for every provider that the
``risoluto_webhook_providers`` hook contributes (linear and github built in).

Per request: the provider verifies the exact body with secrets read from the secret
store at that moment (rotation without restart), the delivery is stored once in
``webhook_inbox`` and handed to ``risoluto_webhook_received``; a duplicate answers
200 ``{"ok": true, "duplicate": true}`` and is not handed on. A row is marked once handed
on; what a crash left stored but not handed on is handed on at the next start or at the
sender's retry (at least once). These routes are exempt
from the write guard (matched route under ``/webhooks/``): the HMAC is their guard.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from prometheus_client import Counter
from quart import Blueprint, request

from risoluto.errors import ApiError, StartupError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.webhooks import WebhookDelivery, WebhookProvider
from risoluto.openapi import api
from risoluto.requests import strict_loads
from risoluto.shielded import to_the_end

from ._store import Inbox

log = logging.getLogger("risoluto.webhooks")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
_STATE = "webhooks.inbox"
_ACK = {
    "type": "object", "required": ["ok", "duplicate"],
    "properties": {"ok": {"type": "boolean"}, "duplicate": {"type": "boolean"}},
}


class WebhookState:
    def __init__(self, kernel: Any, providers: list[WebhookProvider]):
        self.kernel = kernel
        self.providers = providers
        self.inbox = Inbox(kernel.settings.data_path)
        self.deliveries = Counter("risoluto_webhook_deliveries", "Webhook deliveries by provider and result",
                                  ("provider", "result"), registry=kernel.metrics_registry)
        # (provider, delivery id) being handed on by this process now
        self.in_flight: set[tuple[str, str]] = set()

    async def secret(self, name: str) -> str | None:
        """The SecretReader handed to providers: the live store, read per request."""
        store = self.kernel.backends.secrets.store
        if store is None:
            raise ApiError(503, "webhook_not_configured",
                           "Webhook secrets are unavailable: the secret store is locked (no master key).")
        try:
            return await store.get(name)
        except Exception as exc:  # never leak store details; the message names no value
            log.error("reading webhook secret %s failed: %s", name, type(exc).__name__)
            raise ApiError(503, "webhook_not_configured", "The webhook secret cannot be read.") from None


def _providers(kernel: Any) -> list[WebhookProvider]:
    seen: dict[str, WebhookProvider] = {}
    for provider in kernel.hooks.webhook_providers(kernel.settings):
        name = getattr(provider, "name", "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise StartupError(f"webhook provider {provider!r}: invalid name {name!r} (expected {_NAME.pattern})")
        if name in seen:
            raise StartupError(f"two webhook providers are named {name!r}; disable one of the plugins")
        seen[name] = provider
    return list(seen.values())


def state_of(kernel: Any) -> WebhookState:
    return kernel.state[_STATE]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _hand_on(state: WebhookState, delivery: WebhookDelivery) -> None:
    """To the consumers, then marked in the inbox; a crash in between hands it on again."""
    try:
        state.kernel.hooks.webhook_received(delivery)
    except Exception:  # stored durably already; a broken consumer must not make the sender retry
        log.exception("a risoluto_webhook_received hook failed for %s %s", delivery.provider, delivery.delivery_id)
    await state.inbox.mark_handed_on(delivery.provider, delivery.delivery_id)


async def hand_on_left_over(state: WebhookState, provider: str | None = None) -> int:
    """Hand on deliveries that an earlier run stored but stopped before handing on (a crash
    between the two); at startup, and when a sender retries one. Returns how many."""
    count = 0
    for row in await state.inbox.not_handed_on(provider):
        key = (row.provider, row.delivery_id)
        if key in state.in_flight:
            continue  # its own request is handing it on right now
        state.in_flight.add(key)
        try:
            await _hand_on(state, WebhookDelivery(provider=row.provider, delivery_id=row.delivery_id, event=row.event,
                                                  payload=_parsed(row.body), received_at=row.received_at))
        finally:
            state.in_flight.discard(key)
        count += 1
    return count


def _parsed(body: bytes) -> Any:
    """The payload of a stored delivery: its body as JSON (what the built-in providers hand on)."""
    try:
        return strict_loads(body)
    except ValueError:
        return body


def _view(state: WebhookState, provider: WebhookProvider) -> Any:
    async def receive() -> Any:
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        try:
            delivery_id, event, payload = await provider.verify(body, request.headers, state.secret)
        except ApiError as err:
            state.deliveries.labels(provider.name, err.code).inc()
            raise
        async def record_and_hand_on() -> bool:
            received_at = _now()  # one time for the row and the delivery, as a replay of it has
            fresh = await state.inbox.record(provider.name, delivery_id, event, body, received_at)
            if not fresh:  # a sender's retry after a crash: its delivery may be stored, not handed on
                await hand_on_left_over(state, provider.name)
                return False
            # taken before any await: a retry's scan that found this row pending leaves it alone
            # (its result comes back after this task has resumed: one thread, answers in order)
            key = (provider.name, delivery_id)
            state.in_flight.add(key)
            try:
                await _hand_on(state, WebhookDelivery(provider=provider.name, delivery_id=delivery_id,
                                                      event=event, payload=payload, received_at=received_at))
            finally:
                state.in_flight.discard(key)
            return True

        # recorded and handed on together: if the sender hung up in between, its retry would be
        # a duplicate and the delivery would never reach a consumer
        if not await to_the_end(record_and_hand_on()):
            state.deliveries.labels(provider.name, "duplicate").inc()
            return {"ok": True, "duplicate": True}
        state.deliveries.labels(provider.name, "accepted").inc()
        return {"ok": True, "duplicate": False}

    receive.__name__ = f"webhook_{provider.name.replace('-', '_')}"
    summary = f"Receive a signed {provider.name} webhook delivery (HMAC-verified, deduplicated)"
    return api(summary, tags=("webhooks",), responses={200: _ACK})(receive)


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    state = kernel.state[_STATE] = WebhookState(kernel, _providers(kernel))
    bp = Blueprint("risoluto_webhooks", __name__)
    for provider in state.providers:
        bp.add_url_rule(f"/webhooks/{provider.name}", view_func=_view(state, provider), methods=["POST"])
    return [bp]


class InboxService:
    name = "webhooks.inbox"

    def __init__(self, kernel: Any):
        self.kernel = kernel

    async def start(self) -> None:
        state = state_of(self.kernel)
        try:
            await state.inbox.open()
        except Exception as exc:
            raise StartupError(f"webhook inbox {state.inbox.path}: cannot open ({exc})") from None
        left_over = await hand_on_left_over(state)
        if left_over:
            log.warning("handed on %d webhook deliveries that the last run stored but stopped before handing on",
                        left_over)

    async def stop(self) -> None:
        await state_of(self.kernel).inbox.close()


@hookimpl
def risoluto_app_services(kernel: Any) -> list[Any]:
    return [InboxService(kernel)] if _STATE in kernel.state else []


def _stored_names(kernel: Any) -> set[str] | None:
    """Secret names (never values) in the store; None when it cannot be asked from here.

    In the app the doctor runs in a worker thread: ask the live store on the app's loop.
    From the CLI (no loop, no started services) open the store read-only for a moment
    when MASTER_KEY is in the environment.
    """
    import asyncio

    import anyio.from_thread

    store = kernel.backends.secrets.store
    try:
        if store is not None:
            return set(anyio.from_thread.run(store.list))
        if not kernel.settings.master_key or not kernel.settings.data_path.is_dir():
            return None  # nothing to read, and a doctor must not create the data directory
        asyncio.get_running_loop()
        return None  # a loop runs in this thread: we cannot block on it
    except RuntimeError:
        pass
    except Exception:
        return None
    return _names_from_cli(kernel)


def _names_from_cli(kernel: Any) -> set[str] | None:
    import asyncio

    async def run() -> set[str]:
        cold = kernel.hooks.secret_store(kernel.settings, kernel.settings.master_key)
        if cold is None:
            raise LookupError("no secret store backend")
        await cold.open()  # must not write before the key is verified (SecretStore protocol)
        try:
            return set(await cold.list())
        finally:
            await cold.close()

    try:
        return asyncio.run(run())
    except Exception:  # wrong key, missing data, ...: the secrets plugin's own check says why
        return None


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    item = "Webhook secrets"
    try:
        providers = state_of(kernel).providers if _STATE in kernel.state else _providers(kernel)
    except StartupError as exc:
        return [CheckResult(item=item, status=FAIL, reason=str(exc), fix="fix or disable the provider plugin")]
    wanted = {p.name: tuple(getattr(p, "secret_names", ())) for p in providers}
    names = _stored_names(kernel)
    if names is None:
        return [CheckResult(item=item, status=WARN,
                            reason="the secret store is not open here: webhook routes answer 503 "
                                   "webhook_not_configured",
                            fix="set MASTER_KEY and the webhook secrets (risoluto secrets set ...)")]
    missing = [p for p, secrets in wanted.items()
               if secrets and not any(n in names for s in secrets for n in (s, f"{s}_PREVIOUS"))]
    if missing:
        return [CheckResult(item=item, status=WARN,
                            reason=f"no signing secret for: {', '.join(missing)} (503 webhook_not_configured)",
                            fix="set " + ", ".join(s for p in missing for s in wanted[p]) + " in the secret store")]
    return [CheckResult(item=item, status=PASS, reason=f"signing secrets set for: {', '.join(wanted) or 'none'}")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["webhook verification"]
