"""The data-plane role (docs/data-plane.md): ``risoluto serve --data-plane``.

A data plane is the same kernel app with a role. It holds the Docker socket and serves only
the sandbox runtime operations under ``/dp/v1/`` (routes in ``_routes``) to its control
plane; the control plane serves the public API and needs no Docker access (its side of the
link is the sandbox package's ``remote_runtime``; the spec's JSON form, ``sandbox._wire``, is
shared by both sides).

- Plugins: only :data:`KEEP` of the default plugins load (client address, rate limit,
  metrics, the docker runtime, the image check and this one). The secrets API and store,
  webhooks, the write/read guards and the sandbox API are not loaded; the kernel's own
  routes (overlay, hardening, runtime, openapi) exist but answer 404 (see the guard).
- Bind: an IP address of a private network (10/8, 172.16/12, 192.168/16, fc00::/7), e.g. the
  gateway of ``risoluto-internal`` (``RISOLUTO_BIND=docker:risoluto-internal``); never
  loopback, 0.0.0.0/:: or a public address.
- Auth: ``Authorization: Bearer <RISOLUTO_DATA_PLANE_SECRET>`` on every request, any
  method, any path, compared in constant time; 401 ``data_plane_unauthorized`` otherwise.
- Rate limits: ``/dp/`` counts in the ``api`` bucket (``rateLimit.api``). Writes that pass
  are audited in ``<DATA_DIR>/write-audit.log`` with principal ``data-plane``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from ...errors import ApiError, StartupError
from ...fsutil import append_line
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ...hookspecs.ratelimit import RateRule
from ...http_checks import bearer_token, digest_matches, token_digest
from ...roles import HINT, KEEP, MIN_SECRET, ROLE, SECRET_ENV, check_secret, header_safe, resolve_bind
from ..sandbox._wire import PREFIX
from ._routes import STATE, DataPlaneService, DataPlaneState, blueprint

log = logging.getLogger("risoluto.data_plane")
_SERVED = (PREFIX + "/", "/metrics")


# --- the guard: every request needs the secret ------------------------------------------
@hookimpl(tryfirst=True)
def risoluto_request_authorize(kernel: Any, info: Any, settings: Any) -> ApiError | None:
    if settings.sandbox.role != ROLE:
        return None
    state = kernel.state.get(STATE)
    if state is None:  # the app was created as a control plane: the role cannot change later
        return None
    if not digest_matches(bearer_token(info.headers), state.digest):
        return ApiError(401, "data_plane_unauthorized", f"A data plane needs Authorization: Bearer <{SECRET_ENV}>.",
                        {"WWW-Authenticate": 'Bearer realm="risoluto-data-plane"'})
    if info.route is not None and not info.route.startswith(_SERVED):
        return ApiError(404, "not_found", f"A data plane serves only {PREFIX}/ (and /metrics).")
    info.principal = ROLE
    info.admitted = True
    return None


@hookimpl
def risoluto_request_completed(kernel: Any, info: Any, status: int) -> None:
    """The write audit of the data plane (the write guard is not loaded here)."""
    if kernel.settings.sandbox.role != ROLE or not info.admitted or not info.mutating:
        return
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "method": info.method, "path": info.path, "status": status, "remote": info.client,
             "principal": ROLE, "request_id": info.request_id}
    try:
        append_line(kernel.settings.data_path / "write-audit.log", json.dumps(entry, ensure_ascii=True))
    except OSError as exc:  # the response is decided; never a 500
        log.error("cannot append to write-audit.log (%s): the entry for %s %s (request %s) is lost",
                  exc.strerror or exc, info.method, info.path, info.request_id)
    except Exception:
        log.exception("cannot append to the write audit log")


# --- wiring --------------------------------------------------------------------------------
@hookimpl
def risoluto_ratelimit_rules(settings: Any) -> list[RateRule]:
    if settings.sandbox.role != ROLE:
        return []
    api = settings.rate_limit.api
    return [RateRule(bucket="api", limit=api.limit, window_seconds=api.window_seconds, prefixes=("/dp/",))]


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    if kernel.settings.sandbox.role != ROLE:
        return []
    secret = (kernel.environ.get(SECRET_ENV) or "").strip()
    ok = len(secret) >= MIN_SECRET and header_safe(secret)
    digest = token_digest(secret) if ok else None  # only the digest is kept
    kernel.state[STATE] = DataPlaneState(digest=digest)
    return [blueprint(kernel)]


@hookimpl
def risoluto_app_services(kernel: Any) -> list[Any]:
    return [DataPlaneService(kernel, KEEP)] if STATE in kernel.state else []


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    settings = kernel.settings
    if settings.sandbox.role != ROLE:
        return []
    out = []
    try:
        check_secret(kernel.environ)
        out.append(CheckResult(item="data plane secret", status=PASS,
                               reason=f"{SECRET_ENV} is set; every request needs it (constant-time compare)"))
    except StartupError as exc:
        out.append(CheckResult(item="data plane secret", status=FAIL, reason=str(exc), fix=f"set {SECRET_ENV}"))
    try:
        bind = resolve_bind(settings.server.bind, kernel.environ)
        out.append(CheckResult(item="data plane bind", status=PASS, reason=f"listens on {bind} (a private network)"))
    except StartupError as exc:
        out.append(CheckResult(item="data plane bind", status=FAIL, reason=str(exc), fix=HINT))
    loaded = sorted({p.name for p in kernel.plugins if p.source == "default"} - KEEP)
    out.append(CheckResult(
        item="data plane plugins", status=FAIL if loaded else PASS,
        reason=f"plugins a data plane must not load: {', '.join(loaded)}" if loaded else
        "no secrets API, webhooks, overlay or public sandbox API; only /dp/v1/ is served",
        fix="start it with `risoluto serve --data-plane`" if loaded else ""))
    return out


@hookimpl
def risoluto_checklist_provides(kernel: Any) -> list[str]:
    # a data plane's secret guards every request (reads and writes), and its received specs go
    # through the same policy guard as on the control plane (``_routes.enforce``)
    return ["write guard", "read guard", "sandbox policy check"] if kernel.settings.sandbox.role == ROLE else []
