"""``create_app``: the Quart app with the request pipeline of DESIGN.md.

request id -> body limit -> client address -> rate limit -> authorization hooks ->
route -> completion hooks (audit, metrics) -> response headers.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import posixpath
import re
import time
from typing import Any, Mapping

from quart import Quart, Request, Response, g, request
from quart.ctx import RequestContext
from quart.globals import request_ctx
from werkzeug.exceptions import HTTPException

from . import __version__
from .body_deadline import INFO_KEY, TIMED_OUT_KEY, BodyDeadline
from .doctor import doctor_blueprint
from .errors import ApiError, error_body
from .hookspecs.auth import RequestInfo
from .kernel import Kernel
from .openapi import api, build_document
from .overlay import overlay_blueprint
from .settings import Settings

log = logging.getLogger("risoluto")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def normalise_path(path: str) -> str:
    """The canonical form guards and limits use for paths the router did not match."""
    # collapse slashes AFTER prefixing "/": normpath keeps a leading "//" (POSIX), which
    # would let "/METRICS" (-> "//metrics") escape every prefix rule
    norm = posixpath.normpath(re.sub(r"/+", "/", "/" + path.lower()))
    return norm if norm != "." else "/"


@functools.lru_cache(maxsize=512)
def _error_bytes(code: str, message: str) -> bytes:
    # Refusals repeat (a flood of 429s, bad tokens): encode each distinct envelope once.
    return (json.dumps(error_body(code, message), separators=(",", ":")) + "\n").encode()


def error_response(err: ApiError) -> Response:
    response = Response(_error_bytes(err.code, err.message), status=err.status, content_type="application/json")
    if err.headers:
        response.headers.extend(err.headers.items())
    return response


def create_app(
    settings: Settings,
    *,
    plugins: tuple[tuple[str, Any], ...] = (),
    environ: Mapping[str, str] | None = None,
) -> Quart:
    """Build the app and ITS OWN plugin manager. ``plugins`` adds (name, plugin) pairs."""
    kernel = Kernel(settings, plugins, environ)
    app = _KernelQuart("risoluto")
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.server.body_timeout_seconds  # BodyDeadline below comes first
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Exact paths: no slash merging, no redirects a guard would have to second-guess.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = True
    app.extensions["risoluto"] = kernel
    _install_error_handlers(app)
    app.register_blueprint(_core_blueprint(kernel))
    app.register_blueprint(overlay_blueprint(kernel))
    app.register_blueprint(doctor_blueprint(kernel))
    for blueprint in kernel.hooks.app_blueprints(kernel):
        app.register_blueprint(blueprint)
    _install_lifecycle(app, kernel)
    # a body still arriving after server.bodyTimeoutSeconds: 408 and the connection closed
    app.asgi_app = BodyDeadline(app.asgi_app, settings.server.body_timeout_seconds,  # type: ignore[method-assign,assignment]
                                _new_request_id)
    return app


def kernel_of(app: Quart) -> Kernel:
    return app.extensions["risoluto"]


# Request ids: a random per-process prefix and a counter, 32 hex characters like a uuid4().hex.
# They only need to be unique, not secret; this avoids a getrandom() call per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _sent_request_id(scope: dict[str, Any]) -> str:
    # Scanned from the ASGI scope: a werkzeug Headers.get() of an absent header raises and
    # catches an exception, which costs more than this loop.
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode("latin-1")
    return ""


@functools.lru_cache(maxsize=1024)
def _blueprints_of(endpoint: str) -> tuple[str, ...]:
    """``a.b.view`` -> ``("a.b", "a")``: Quart's Request.blueprints, per endpoint (a finite set)."""
    name = endpoint.rpartition(".")[0]
    names: list[str] = []
    while name:
        names.append(name)
        name = name.rpartition(".")[0]
    return tuple(names)


class _KernelRequest(Request):
    """Quart's Request, with ``blueprints`` looked up per endpoint rather than re-split from it:
    Quart reads it three times per request (before, after, teardown), and every kernel route
    lives in a blueprint."""

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        return list(_blueprints_of(rule.endpoint)) if rule is not None else []


class _KernelQuart(Quart):
    """Quart with the kernel's request pipeline built into its request steps.

    As registered before/after/teardown functions, Quart would resolve each through
    ``ensure_async`` and the ``request``/``g`` proxies on every request (measured in
    bench/http_overhead.py). Built in, the steps run where those functions ran: the pipeline
    first (before any url_value_preprocessor or before_request function of the app or a
    blueprint), the response headers and completion hooks after every after_request function,
    the "client left" record at teardown. The RequestInfo travels in the ASGI scope
    (``INFO_KEY``); ``g.info`` is set for the routes.
    """

    request_class = _KernelRequest

    @property
    def kernel(self) -> Kernel:
        return self.extensions["risoluto"]  # type: ignore[no-any-return]  # the one place it is kept

    async def preprocess_request(self, request_context: RequestContext | None = None) -> Any:
        ctx = request_context or request_ctx._get_current_object()  # type: ignore[attr-defined]
        refusal = await _pipeline(self.kernel, ctx)
        if refusal is not None:
            return refusal
        return await super().preprocess_request(ctx)

    async def process_response(self, response: Any, request_context: RequestContext | None = None) -> Any:
        ctx = request_context or request_ctx._get_current_object()  # type: ignore[attr-defined]
        response = await super().process_response(response, ctx)
        _finish(self.kernel, _scope(ctx).get(INFO_KEY), response)
        return response

    async def do_teardown_request(self, exc: BaseException | None,
                                  request_context: RequestContext | None = None) -> None:
        ctx = request_context or request_ctx._get_current_object()  # type: ignore[attr-defined]
        try:
            await super().do_teardown_request(exc, ctx)
        finally:
            _left(self.kernel, _scope(ctx))


def _scope(ctx: RequestContext) -> dict[str, Any]:
    return ctx.request.scope  # type: ignore[return-value]  # a TypedDict to mypy; the kernel adds its keys


async def _pipeline(kernel: Kernel, ctx: RequestContext) -> Response | None:
    req = ctx.request
    scope = _scope(ctx)
    sent = _sent_request_id(scope)
    peer = (scope.get("client") or ("", 0))[0] or ""
    url_rule = req.url_rule
    rule = url_rule.rule if url_rule is not None else None
    path = req.path
    info = RequestInfo(
        method=req.method, path=path, route=rule, headers=req.headers, peer=peer,
        request_id=sent if _REQUEST_ID.match(sent) else _new_request_id(),
        norm_path=rule if rule is not None else normalise_path(path), started=time.perf_counter(),
    )
    g._get_current_object().info = info  # type: ignore[attr-defined]  # routes read g.info
    scope[INFO_KEY] = info  # for _finish, _left and BodyDeadline's 408 (request id, rate-limit headers)
    length = req.content_length
    settings = kernel.settings
    if length is not None and length > settings.server.max_body_bytes:
        return error_response(ApiError(413, "payload_too_large", "The request body is larger than 1 MiB."))
    decided = kernel.hooks.client_address(info, settings)
    info.client, info.via_proxy = decided if decided is not None else (peer, False)
    refusal = await _rate_limit(kernel, info)
    if refusal is None:
        refusal = kernel.hooks.request_authorize(info, settings)
        if refusal is not None:
            info.refused = refusal.code  # guard denials by code (metrics)
    return error_response(refusal) if refusal is not None else None


def _finish(kernel: Kernel, info: RequestInfo | None, response: Response) -> None:
    out = response.headers
    if info is None:  # failed before the pipeline ran (e.g. a malformed request line)
        out["X-Request-ID"] = _new_request_id()
        return
    out["X-Request-ID"] = info.request_id
    for name, value in info.rate_headers:  # add() each: extend() walks them through a generator
        out.add(name, value)
    _completed(kernel, info, response.status_code)


def _left(kernel: Kernel, scope: dict[str, Any]) -> None:
    info = scope.get(INFO_KEY)
    if info is not None and not info.completed:
        # no response went out: the client left and Quart cancelled the handler. Observers
        # (the write audit among them) still hear of the request, as nginx's 499 (or as
        # the 408 BodyDeadline sent when the body was too slow).
        _completed(kernel, info, 408 if scope.get(TIMED_OUT_KEY) else CLIENT_CLOSED_REQUEST)


CLIENT_CLOSED_REQUEST = 499


def _completed(kernel: Kernel, info: RequestInfo, status: int) -> None:
    info.completed = True
    try:
        kernel.hooks.request_completed(info, status, time.perf_counter() - info.started)
    except Exception:  # observers must never turn a response into a 500
        log.exception("request_completed hook failed")


async def _rate_limit(kernel: Kernel, info: RequestInfo) -> ApiError | None:
    limiter = kernel.backends.limiter
    if limiter is None:
        return None
    rule = _rule_for(kernel, info)
    if rule is None:
        return None
    try:
        decision = await limiter.hit(rule.bucket, info.client, rule.limit, rule.window_seconds)
    except Exception:
        log.exception("rate-limit backend failed")
        if kernel.settings.rate_limit.fail_open and not info.mutating:
            return None
        return ApiError(503, "rate_limiter_unavailable", "The rate-limit backend is unavailable; try again later.")
    reset = max(0, int(decision.reset_seconds + 0.999))
    headers = (
        ("RateLimit-Limit", str(decision.limit)),
        ("RateLimit-Remaining", str(decision.remaining)),
        ("RateLimit-Reset", str(reset)),
    )
    info.rate_headers = headers
    info.rate_bucket = rule.bucket
    if decision.allowed:
        return None
    info.rate_limited = True
    # The RateLimit-* headers are added to every limited response in _finish.
    return ApiError(429, "rate_limited", f"Too many requests; retry in {max(reset, 1)} s.",
                    {"Retry-After": str(max(reset, 1))})


def _rule_for(kernel: Kernel, info: RequestInfo) -> Any:
    """The first rule matching the request; cached per matched route (a finite set)."""
    path = info.norm_path
    if info.route is None:
        return next((r for r in kernel.backends.rate_rules if r.matches(path)), None)
    rules, cache = kernel.state.get("kernel.rate_rule_cache", (None, {}))
    current = kernel.backends.rate_rules
    if rules is not current:  # rules replaced (an overlay, a restart of the limiter)
        cache = {}
        kernel.state["kernel.rate_rule_cache"] = (current, cache)
    if path not in cache:
        cache[path] = next((r for r in current if r.matches(path)), None)
    return cache[path]


def _install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(err: ApiError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        if 300 <= status < 400:  # routing redirects: paths are matched exactly instead
            status = 404
        code = _HTTP_CODES.get(status, "http_error" if status < 500 else "internal_error")
        messages = {
            404: "No such route.",
            405: "Method not allowed on this route.",
            413: "The request body is larger than the limit (1 MiB).",
        }
        fallback = (err.description or "Bad request.") if status < 500 else "Internal error."
        message = messages.get(status, fallback)
        response = error_response(ApiError(status, code, message))
        if status == 405 and err.response is None:
            allow = getattr(err, "valid_methods", None) or []
            response.headers["Allow"] = ", ".join(sorted(allow))
        return response

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        log.error("unhandled error in %s %s: %s", request.method, request.path, type(err).__name__,
                  exc_info=err)
        return error_response(ApiError(500, "internal_error", "Internal error; see the server log."))


def _core_blueprint(kernel: Kernel) -> Any:
    from quart import Blueprint

    bp = Blueprint("risoluto_core", __name__)

    # Static for the life of the app (plugins and bind never change while serving), so the
    # body is encoded once: this public route is the cheapest thing a client can ask for.
    s = kernel.settings.server
    runtime_body = json.dumps({
        "version": __version__,
        "plugins": [
            {"name": p.name, "source": p.source, "distribution": p.distribution, "version": p.version}
            for p in kernel.plugins
        ],
        "bind": {"host": s.bind, "port": s.port},
    }, separators=(",", ":")).encode()

    @bp.get("/api/v1/runtime")
    @api("Version, loaded plugins and bind address (public)", tags=("kernel",), responses={200: RUNTIME_SCHEMA})
    async def runtime() -> Any:
        return Response(runtime_body, content_type="application/json")

    @bp.get("/api/v1/openapi.json")
    @api("This OpenAPI document (public)", tags=("kernel",), responses={200: {"type": "object"}})
    async def openapi() -> Any:
        from quart import current_app

        return build_document(current_app)  # type: ignore[arg-type]

    return bp


_STR = {"type": "string"}
RUNTIME_SCHEMA = {
    "type": "object",
    "required": ["version", "plugins", "bind"],
    "properties": {
        "version": _STR,
        "plugins": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "source", "distribution", "version"],
                "properties": {"name": _STR, "source": _STR, "distribution": _STR, "version": _STR},
            },
        },
        "bind": {
            "type": "object",
            "required": ["host", "port"],
            "properties": {"host": _STR, "port": {"type": "integer"}},
        },
    },
}


def _install_lifecycle(app: Quart, kernel: Kernel) -> None:
    app.before_serving(kernel.start)
    app.after_serving(kernel.stop)


__all__ = ["create_app", "kernel_of", "error_body", "normalise_path"]
