"""Helpers for reading request bodies into clear 400s."""

from __future__ import annotations

import json
from typing import Any

from quart import request

from .errors import ApiError

MAX_JSON_INT = 2**63 - 1  # no field needs more; beyond it Python's int would reach float math unchecked


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    number = int(text)
    if abs(number) > MAX_JSON_INT:
        raise ValueError("integer out of range")
    return number


def strict_loads(raw: bytes | str) -> Any:
    """JSON as the RFC has it, or ValueError: no NaN or Infinity, integers within 64 bits, and
    no nesting deep enough to exhaust the parser. Strings may still hold a lone surrogate
    (``"\\ud800"``, legal JSON syntax); each field's own check refuses it with its own code."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or 400 ``invalid_json``."""
    raw = await request.get_data()
    try:
        data = strict_loads(raw)
    except ValueError:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return data
