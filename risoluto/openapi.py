"""OpenAPI 3.1 document generated from the app's routes.

A route declares its contract with :func:`api`; the generator walks ``app.url_map``, so a
route a plugin adds appears automatically. A route without a declaration is still listed,
with the error envelope and a response of unspecified shape, and ``x-risoluto-undeclared``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from quart import Quart

from . import __version__

ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string", "pattern": "^[a-z0-9_]+$"}, "message": {"type": "string"}},
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_PARAM = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def api(
    summary: str,
    *,
    request: dict[str, Any] | None = None,
    responses: dict[int, dict[str, Any] | None] | None = None,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a route's request body and responses (JSON Schemas; None = no body)."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func._risoluto_openapi = {  # type: ignore[attr-defined]
            "summary": summary, "request": request, "responses": responses or {200: None}, "tags": list(tags),
        }
        return func

    return mark


def _operation(rule: Any, method: str, view: Callable[..., Any]) -> dict[str, Any]:
    meta = getattr(view, "_risoluto_openapi", None)
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(rule.rule)
    ]
    op: dict[str, Any] = {"operationId": f"{method.lower()}_{rule.endpoint.replace('.', '_')}"}
    if params:
        op["parameters"] = params
    if meta is None:
        op["summary"] = f"{method} {rule.rule}"
        op["x-risoluto-undeclared"] = True
        op["responses"] = {"default": {"description": "Undeclared response; errors use the envelope"}}
        return op
    op["summary"] = meta["summary"]
    if meta["tags"]:
        op["tags"] = meta["tags"]
    if meta["request"] is not None and method in ("POST", "PUT", "PATCH"):
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": meta["request"]}}}
    responses: dict[str, Any] = {}
    for status, schema in meta["responses"].items():
        entry: dict[str, Any] = {"description": f"HTTP {status}"}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": schema}}
        responses[str(status)] = entry
    responses["default"] = {"description": "Error", "content": {"application/json": {"schema": _ERROR_REF}}}
    op["responses"] = responses
    return op


def build_document(app: Quart) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        path = _PARAM.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule, method, view)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Risoluto hardening kernel", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
