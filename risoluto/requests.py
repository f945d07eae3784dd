"""Helpers for reading request bodies into clear 400s."""

from __future__ import annotations

import json
from typing import Any

from quart import request

from .errors import ApiError


async def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or 400 ``invalid_json``."""
    raw = await request.get_data()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return data
