"""Read guard (docs/http-security.md): reads of ``/api/*`` and ``/metrics`` from other machines need a
bearer token (read or write token), else 401 ``read_unauthorized``.

Public: the matched routes ``/api/v1/runtime`` and ``/api/v1/openapi.json`` only. The
path judged is the matched rule, or the normalised path of an unmatched request, so
``/API/v1/secrets``, ``/api//v1/secrets``, ``/metrics/`` ... are guarded like the real
route. Tokens are read from the ``Authorization`` header only, never the query string.

Choices made here (docs/http-security.md):
- Guarded methods are the safe ones (GET, HEAD, OPTIONS); writes belong to the write guard.
- A non-loopback read while NO token is configured at all (e.g. through a trusted proxy
  with no token) is refused with 403 ``read_forbidden``: there is nothing it could send.
- A loopback read whose ``Host`` is not a loopback name is a DNS-rebinding page reading
  the API: it needs the bearer token like a remote read.
- A console session cookie (signed in with the read or the write token, see
  ``risoluto.sessions``) counts as that token: principal ``session``.
"""

from __future__ import annotations

from typing import Any

from risoluto.errors import ApiError
from risoluto.addresses import is_loopback_bind
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.auth import RequestInfo
from risoluto.hookspecs.doctor import FAIL, PASS, CheckResult
from risoluto.settings import Settings

from risoluto.sessions import session_of
from risoluto.http_checks import (
    bearer_token, guarded_path, host_is_loopback, is_local_client, matches_any, single_header,
)

PUBLIC_ROUTES = frozenset({"/api/v1/runtime", "/api/v1/openapi.json"})
GUARDED_EXACT = frozenset({"/metrics", "/api"})
GUARDED_PREFIXES = ("/api/",)


def is_guarded(info: RequestInfo) -> bool:
    if info.route is not None and info.route in PUBLIC_ROUTES:
        return False
    path = guarded_path(info)
    return path in GUARDED_EXACT or path.startswith(GUARDED_PREFIXES)


def _local_and_not_rebound(info: RequestInfo) -> bool:
    if not is_local_client(info):
        return False
    hosts, host = single_header(info.headers, "Host")
    return hosts == 0 or (hosts == 1 and host_is_loopback(host))


def reader(kernel: Any, info: RequestInfo, settings: Settings) -> str | ApiError:
    """Who may read: ``loopback``, ``token`` or ``session``; else the refusal. Also what the
    console page (``GET /``) asks, so the page is guarded exactly like ``/api/*``."""
    if _local_and_not_rebound(info):
        return "loopback"
    s = settings.server
    tokens = [t for t in (s.read_token, s.write_token) if t]
    if not tokens:
        return ApiError(403, "read_forbidden",
                        "Reads from other machines need RISOLUTO_READ_TOKEN to be configured.")
    token = bearer_token(info.headers)
    if token is not None:  # an explicit bearer decides; a cookie beside it is not consulted
        if matches_any(token, *tokens):
            return "token"
    elif session_of(info, kernel) is not None:
        return "session"
    return ApiError(401, "read_unauthorized", "This read needs Authorization: Bearer <token>.",
                    {"WWW-Authenticate": 'Bearer realm="risoluto"'})


def authorize(kernel: Any, info: RequestInfo, settings: Settings) -> ApiError | None:
    if info.mutating or not is_guarded(info):
        return None
    who = reader(kernel, info, settings)
    if isinstance(who, ApiError):
        return who
    info.principal = who
    return None


@hookimpl
def risoluto_request_authorize(kernel: Any, info: RequestInfo, settings: Settings) -> ApiError | None:
    return authorize(kernel, info, settings)


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    s = kernel.settings.server
    if s.read_token or s.write_token:
        which = "RISOLUTO_READ_TOKEN" if s.read_token else "RISOLUTO_WRITE_TOKEN"
        return [CheckResult(item="Read guard", status=PASS,
                            reason=f"remote reads of /api/* and /metrics need a bearer token ({which})")]
    if is_loopback_bind(s.bind):
        return [CheckResult(item="Read guard", status=PASS,
                            reason=f"bound to {s.bind}; remote reads of /api/* and /metrics are refused (403)")]
    return [CheckResult(item="Read guard", status=FAIL,
                        reason=f"bound to {s.bind} with no token: remote reads are refused and serve will not start",
                        fix="set RISOLUTO_READ_TOKEN (and RISOLUTO_WRITE_TOKEN for remote writes)")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["read guard"]
