"""Write guard (docs/http-security.md, "Write guard"): the published four-row table, plus the
browser defence for token-less loopback writes and the write audit log.

| request                                          | answer                         |
|--------------------------------------------------|--------------------------------|
| GET / HEAD / OPTIONS                             | not this guard's business      |
| matched route under /webhooks/                   | left to the route's HMAC check |
| matched console sign-in / sign-out route         | left to the route (own checks) |
| write token set, valid bearer                    | allowed, principal "token"     |
| write token set, no bearer, write-token session  | allowed, principal "session",  |
|   cookie                                         |   if Origin is this server's   |
| write token set, bearer missing/invalid          | 401 write_unauthorized         |
| no write token, loopback peer (not via a proxy)  | allowed, principal "loopback"  |
|   ... but a non-loopback Origin or Host          | 403 write_forbidden            |
| no write token, anything else                    | 403 write_forbidden            |

"Routes under /webhooks/" is decided on the MATCHED ROUTE, never on the raw path: an
unmatched request (404/405) is judged like any other write, so no spelling of a path
(case, ``//``, ``%2F``, ``..``, trailing slash) can reach the exemption.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from risoluto.errors import ApiError
from risoluto.addresses import is_loopback_bind
from risoluto.fsutil import append_line, append_problem
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.auth import RequestInfo
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.settings import Settings

from risoluto.sessions import WRITE, request_scheme, same_origin, session_of
from risoluto.http_checks import (
    bearer_token, host_is_loopback, is_local_client, origin_is_loopback, single_header,
    tokens_equal,
)

log = logging.getLogger("risoluto.write_guard")

AUDIT_FILE = "write-audit.log"
WEBHOOK_PREFIX = "/webhooks/"
# The console's sign-in and sign-out check the token / session and the Origin themselves:
# a browser holding only the read token must be able to sign in from afar.
SELF_AUTHORIZED_ROUTES = frozenset({"/console/session", "/console/session/end"})
MIN_TOKEN_LENGTH = 24


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "write_unauthorized", message, {"WWW-Authenticate": 'Bearer realm="risoluto"'})


def _forbidden(message: str) -> ApiError:
    return ApiError(403, "write_forbidden", message)


def _browser_refusal(info: RequestInfo) -> ApiError | None:
    """DNS rebinding / CSRF defence for token-less loopback writes (docs/http-security.md)."""
    origins, origin = single_header(info.headers, "Origin")
    if origins > 1 or (origins == 1 and not origin_is_loopback(origin)):
        return _forbidden("Writes from a web page that is not served from this machine are refused.")
    hosts, host = single_header(info.headers, "Host")
    if hosts > 1 or (hosts == 1 and not host_is_loopback(host)):
        return _forbidden("Token-less writes must address this machine by a loopback name (Host header).")
    return None


def authorize(kernel: Any, info: RequestInfo, settings: Settings) -> ApiError | None:
    if not info.mutating:
        return None
    if info.route is not None and info.route.startswith(WEBHOOK_PREFIX):
        return None  # the webhook route verifies its HMAC itself
    if info.route in SELF_AUTHORIZED_ROUTES:
        info.principal = "sign-in"
        info.admitted = True  # audited: every sign-in attempt and its status
        return None
    write_token = settings.server.write_token
    if write_token:
        # With a token, every write needs it, loopback included (as the original).
        token = bearer_token(info.headers)
        if token is None:
            return _session_writer(kernel, info)
        if not tokens_equal(token, write_token):
            return _unauthorized("The bearer token is missing, malformed or wrong.")
        info.principal = "token"
    elif is_local_client(info):
        refusal = _browser_refusal(info)
        if refusal is not None:
            return refusal
        info.principal = "loopback"
    elif settings.server.read_token:
        return _forbidden("This deployment is read-only from afar (only RISOLUTO_READ_TOKEN is set).")
    else:
        return _forbidden("Writes from other machines need RISOLUTO_WRITE_TOKEN to be configured.")
    info.admitted = True
    return None


def _session_writer(kernel: Any, info: RequestInfo) -> ApiError | None:
    """A console session signed in with the write token stands for the bearer, but only for
    a request the console page itself sent (its Origin is this server): a form or script on
    another site that rides the cookie is refused (CSRF)."""
    session = session_of(info, kernel)
    if session is None:
        return _unauthorized("This write needs Authorization: Bearer <RISOLUTO_WRITE_TOKEN>.")
    if session.kind != WRITE:
        return _forbidden("This console session was signed in with the read token; sign in with the write token.")
    if not same_origin(info, request_scheme()):
        return _forbidden("A cookie-authenticated write must come from the console page of this server (Origin).")
    info.principal = "session"
    info.admitted = True
    return None


@hookimpl
def risoluto_request_authorize(kernel: Any, info: RequestInfo, settings: Settings) -> ApiError | None:
    return authorize(kernel, info, settings)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@hookimpl
def risoluto_request_completed(kernel: Any, info: RequestInfo, status: int) -> None:
    """Audit every mutating request that passed the guard (docs/http-security.md), whatever its outcome."""
    if not info.admitted or info.refused:  # refused by a guard called after us
        return
    entry = {
        "at": _now(), "method": info.method, "path": info.path, "status": status,
        "remote": info.client, "principal": info.principal, "request_id": info.request_id,
    }
    try:
        append_line(kernel.settings.data_path / AUDIT_FILE, json.dumps(entry, ensure_ascii=True))
    except OSError as exc:  # the response is already decided; never turn it into a 500
        log.error("cannot append to %s (%s): the entry for %s %s (request %s) is lost", AUDIT_FILE,
                  exc.strerror or exc, info.method, info.path, info.request_id)
    except Exception:
        log.exception("cannot append to the write audit log")


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    s = kernel.settings.server
    loopback = is_loopback_bind(s.bind)
    results: list[CheckResult] = []
    if s.write_token:
        weak = len(s.write_token) < MIN_TOKEN_LENGTH
        same = s.read_token and tokens_equal(s.read_token, s.write_token)
        status = WARN if weak or same else PASS
        reason = ("RISOLUTO_WRITE_TOKEN is set; every write needs it" +
                  (f"; it is shorter than {MIN_TOKEN_LENGTH} characters" if weak else "") +
                  ("; it equals RISOLUTO_READ_TOKEN" if same else ""))
        results.append(CheckResult(item="Write token", status=status, reason=reason,
                                   fix="use a random token of 32+ characters, distinct from the read token"
                                   if status == WARN else ""))
    elif loopback:
        results.append(CheckResult(item="Write token", status=PASS,
                                   reason=f"bound to {s.bind}: only this machine can write (no token needed)"))
    elif s.read_token:
        results.append(CheckResult(
            item="Write token", status=WARN,
            reason=f"bound to {s.bind} with only RISOLUTO_READ_TOKEN: every remote write is 403 write_forbidden",
            fix="set RISOLUTO_WRITE_TOKEN if remote clients must write",
        ))
    else:
        results.append(CheckResult(
            item="Write token", status=FAIL,
            reason=f"bound to {s.bind} without RISOLUTO_WRITE_TOKEN: `risoluto serve` refuses to start",
            fix="set RISOLUTO_WRITE_TOKEN, or bind 127.0.0.1",
        ))
    results.append(CheckResult(
        item="Write guard", status=PASS,
        reason="mutating requests checked on the routed path; writes audited in "
               f"{kernel.settings.data_path / AUDIT_FILE}",
    ))
    results.append(_audit_check(kernel.settings.data_path / AUDIT_FILE))
    return results


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["write guard"]


def _audit_check(path: Any) -> CheckResult:
    """The write audit is appended after each answer: one that cannot be appended loses entries."""
    problem = append_problem(path)
    if problem is None:
        return CheckResult(item="Write audit log", status=PASS, reason=f"{path} can take new entries")
    return CheckResult(item="Write audit log", status=FAIL, reason=f"{problem}: writes go unrecorded",
                       fix=f"free space on that file system, or make {path} a regular file owned by the kernel's "
                           "user, mode 0600")
