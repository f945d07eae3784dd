"""Linear webhooks (docs/http-security.md, "Webhooks"): ``POST /webhooks/linear``.

``Linear-Signature`` is the lowercase hex HMAC-SHA256 of the exact body under
``LINEAR_WEBHOOK_SECRET`` (or ``LINEAR_WEBHOOK_SECRET_PREVIOUS`` during a rotation);
``webhookTimestamp`` (ms, inside the signed body) must be within 60 s of our clock;
``Linear-Delivery`` is the dedup id. The event is ``<type>.<action>`` (``Issue.update``).
"""

from __future__ import annotations

import time
from typing import Any

from risoluto.errors import ApiError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.webhooks import SecretReader, hmac_sha256_matches, signing_secrets

from ._payload import delivery_id, json_object, signature_header

SECRET = "LINEAR_WEBHOOK_SECRET"
REPLAY_WINDOW_MS = 60_000


class LinearProvider:
    name = "linear"
    secret_names = (SECRET,)

    def __init__(self, clock: Any = time.time):
        self.clock = clock

    async def verify(self, body: bytes, headers: Any, secret: SecretReader) -> tuple[str, str, Any]:
        keys = await signing_secrets(secret, SECRET)
        signature = signature_header(headers, "Linear-Signature")
        if not hmac_sha256_matches(body, keys, signature):
            raise ApiError(401, "signature_invalid", "The Linear-Signature does not match the body.")
        payload = json_object(body)
        stamp = payload.get("webhookTimestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
            raise ApiError(400, "invalid_payload", "webhookTimestamp (milliseconds) is missing from the body.")
        if abs(self.clock() * 1000 - stamp) > REPLAY_WINDOW_MS:
            raise ApiError(401, "replay_rejected", "webhookTimestamp is more than 60 s away from now.")
        ident = delivery_id(headers, "Linear-Delivery")
        kind, action = payload.get("type"), payload.get("action")
        event = ".".join(str(p) for p in (kind, action) if isinstance(p, str) and p) or "unknown"
        return ident, event[:128], payload


@hookimpl
def risoluto_webhook_providers(settings: Any) -> list[Any]:
    return [LinearProvider()]
