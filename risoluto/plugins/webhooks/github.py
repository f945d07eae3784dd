"""GitHub webhooks (docs/http-security.md, "Webhooks"): ``POST /webhooks/github``.

``X-Hub-Signature-256: sha256=<hex>`` is the HMAC-SHA256 of the exact body under
``GITHUB_WEBHOOK_SECRET`` (or ``GITHUB_WEBHOOK_SECRET_PREVIOUS``); ``X-GitHub-Event`` is
required (400 ``invalid_payload`` without it); ``X-GitHub-Delivery`` is the dedup id.
Only JSON bodies (content type ``application/json`` in GitHub's settings) are accepted.
GitHub signs no timestamp: replays are stopped by the delivery-id and body dedup.
"""

from __future__ import annotations

import re
from typing import Any

from risoluto.errors import ApiError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.webhooks import SecretReader, hmac_sha256_matches, signing_secrets

from ._payload import delivery_id, json_object, one_header, signature_header

SECRET = "GITHUB_WEBHOOK_SECRET"
_EVENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


class GitHubProvider:
    name = "github"
    secret_names = (SECRET,)

    async def verify(self, body: bytes, headers: Any, secret: SecretReader) -> tuple[str, str, Any]:
        keys = await signing_secrets(secret, SECRET)
        signature = signature_header(headers, "X-Hub-Signature-256")
        scheme, _, digest = signature.strip().partition("=")
        if scheme.lower() != "sha256" or not hmac_sha256_matches(body, keys, digest):
            raise ApiError(401, "signature_invalid", "The X-Hub-Signature-256 does not match the body.")
        payload = json_object(body)
        event = one_header(headers, "X-GitHub-Event")
        if not event or not _EVENT.match(event.strip()):
            raise ApiError(400, "invalid_payload", "The X-GitHub-Event header is missing or malformed.")
        return delivery_id(headers, "X-GitHub-Delivery"), event.strip(), payload


@hookimpl
def risoluto_webhook_providers(settings: Any) -> list[Any]:
    return [GitHubProvider()]
