"""``GET /api/v1/audit?log=write|secrets&limit=N``: the newest lines of the write audit log
(``write-audit.log``) or the secret audit log (``secrets.audit.log``), newest first.

Read-guarded like every ``/api/*`` read. Only the known fields of each log are returned
(a line is rebuilt from them, never passed through), and neither log ever holds a secret
value: the secret log names keys, the write log names paths. The file is read backwards
from its end, at most ``MAX_TAIL_BYTES``, so a large log costs what the answer needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from quart import Blueprint, request

from risoluto.errors import ApiError
from risoluto.hookspecs import hookimpl
from risoluto.openapi import api

from ._tail import tail_lines

LOGS = {
    "write": ("write-audit.log", ("at", "method", "path", "status", "remote", "principal", "request_id")),
    "secrets": ("secrets.audit.log", ("at", "operation", "key", "principal", "remote", "backend")),
}
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_STR = {"type": "string"}
AUDIT = {
    "type": "object", "required": ["log", "items"], "additionalProperties": False,
    "properties": {
        "log": {"enum": list(LOGS)},
        "items": {"type": "array", "items": {"type": "object", "additionalProperties": {
            "type": ["string", "integer"]}}},
    },
}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _entries(path: Path, fields: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
    out = []
    for raw in tail_lines(path, limit):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue  # a torn line (crash mid-write) is skipped, not a 500
        if isinstance(entry, dict):
            out.append({k: entry[k] for k in fields if isinstance(entry.get(k), (str, int))})
    return out


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text[:6]) <= MAX_LIMIT:
        raise ApiError(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}.")
    return int(text)


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    bp = Blueprint("risoluto_audit", __name__)

    @bp.get("/api/v1/audit")
    @api("Newest lines of the write or the secret audit log (?log=write|secrets&limit=1..1000); never a value",
         tags=("audit",), responses={200: AUDIT, 400: _ERROR})
    async def audit() -> Any:
        which = request.args.get("log", "write")
        if which not in LOGS:
            raise ApiError(400, "invalid_log", "log must be 'write' or 'secrets'.")
        limit = _limit(request.args.get("limit"))
        name, fields = LOGS[which]
        path = kernel.settings.data_path / name
        items = await anyio.to_thread.run_sync(_entries, path, fields, limit)
        return {"log": which, "items": items}

    return [bp]
