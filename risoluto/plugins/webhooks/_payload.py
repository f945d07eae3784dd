"""Shared checks for the built-in webhook providers (not a plugin: leading underscore)."""

from __future__ import annotations

import json
import re
from typing import Any

from risoluto.errors import ApiError
from risoluto.requests import strict_loads
from risoluto.text import is_text

_DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,256}\Z")  # printable ASCII, no spaces


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400 ``invalid_payload`` (see ``strict_loads``)."""
    try:
        data = strict_loads(body)
        if not is_text(json.dumps(data, ensure_ascii=False)):  # stored as text: no lone surrogate
            raise ValueError("lone surrogate")
    except ValueError:
        raise ApiError(400, "invalid_payload", "The webhook body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_payload", "The webhook body must be a JSON object.")
    return data


def one_header(headers: Any, name: str) -> str | None:
    """The header's value when sent exactly once; None when absent; "" when repeated."""
    values = headers.getlist(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ""


def signature_header(headers: Any, name: str) -> str:
    """The signature; 401 ``signature_missing`` if absent or empty; "" (never matches) if repeated."""
    values = headers.getlist(name)
    if not values or (len(values) == 1 and not values[0].strip()):
        raise ApiError(401, "signature_missing", f"The {name} header is missing.")
    return values[0] if len(values) == 1 else ""


def delivery_id(headers: Any, name: str) -> str:
    value = one_header(headers, name)
    if not value or not _DELIVERY_ID.match(value.strip()):
        raise ApiError(400, "delivery_missing", f"The {name} header is missing or malformed.")
    return value.strip()
