"""The egress decisions API: the audit trail, its live stream, approvals, per-issue hosts.

Routes (reads are read-guarded and writes write-guarded like every ``/api`` route):

- ``GET /api/v1/egress/decisions``: recent decisions, newest first, from the in-memory ring
  of the last 1000 (older ones are in ``egress-audit.log`` and its rotated files); filters
  ``sandbox``, ``issue``, ``verdict``, ``since`` (ISO 8601), ``limit`` (1-1000, default 100).
- ``GET /api/v1/egress/decisions/stream``: server-sent events, one ``decision`` event per
  decision from the moment of connecting, within 0.1 s of it.
- ``GET /api/v1/egress/approvals`` and ``POST /api/v1/egress/approvals/{id}``.
- ``GET /api/v1/egress/issues/{issue}/hosts`` and ``DELETE .../hosts/{host}``.

Also the service that flushes the audit writer at shutdown, and the doctor item
**egress audit** (WARN when lines were dropped, FAIL when the file cannot be written).
"""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import anyio
from quart import Blueprint, Response, g, request

from risoluto.errors import ApiError, ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.openapi import api
from risoluto.requests import json_object

from ._approvals import ANSWERS, approvals_for, issue_entry, issue_hosts_for
from ._audit import LOG_NAME, STATE_KEY, RING_SIZE, Decision, audit_for
from ._hosts import parse_entry

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

_TAGS = ("egress",)
_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_INT = {"type": "integer"}
DECISION = {
    "type": "object", "required": ["at", "verdict", "reason"],
    "properties": {
        "at": _STR, "sandbox": _NSTR, "issue": _NSTR, "host": _NSTR, "port": {"type": ["integer", "null"]},
        "sni": _NSTR, "method": _NSTR, "path": _NSTR, "verdict": {"enum": ["allow", "deny", "ask"]},
        "reason": {"type": "string", "pattern": "^[a-z0-9_]+$"}, "rule": _NSTR, "credential": _NSTR,
        "bytes_up": _INT, "bytes_down": _INT, "duration_ms": _INT, "approval": _NSTR, "principal": _NSTR,
    },
}
APPROVAL = {
    "type": "object", "required": ["id", "sandbox", "host", "port", "asked_at", "expires_at"],
    "properties": {"id": _STR, "sandbox": _STR, "issue": _NSTR, "host": _STR, "port": _INT, "asked_at": _STR,
                   "expires_at": _STR},
}
ANSWER = {"type": "object", "required": ["decision"], "additionalProperties": False,
          "properties": {"decision": {"enum": list(ANSWERS)}}}
ISSUE_HOSTS = {"type": "object", "properties": {"issue": _STR, "hosts": {"type": "array", "items": _STR}}}
STREAM_POLL_S = 0.1
KEEPALIVE_S = 15.0


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_filter", message)


def _since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _bad(f"since: {text[:40]!r} is not an ISO 8601 time such as 2026-01-31T12:00:00Z") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def decision_filter(args: Any) -> tuple[Callable[[Decision], bool], int]:
    """(predicate, limit) from the query string; 400 ``invalid_filter`` on anything odd."""
    known = {"sandbox", "issue", "verdict", "since", "limit"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise _bad(f"unknown filter {unknown[0]!r}; use {', '.join(sorted(known))}")
    if any(len(args.getlist(k)) > 1 for k in args):
        raise _bad("give each filter at most once")
    sandbox, issue, verdict = args.get("sandbox"), args.get("issue"), args.get("verdict")
    if verdict is not None and verdict not in ("allow", "deny", "ask"):
        raise _bad("verdict must be allow, deny or ask")
    since = _since(args["since"]).timestamp() if "since" in args else None
    text = args.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= RING_SIZE:
        raise _bad(f"limit must be an integer from 1 to {RING_SIZE}")

    def keep(d: Decision) -> bool:
        return ((sandbox is None or d.sandbox == sandbox) and (issue is None or d.issue == issue)
                and (verdict is None or d.verdict == verdict) and (since is None or d.ts >= since))

    return keep, int(text)


def _canonical_host(text: str) -> str:
    try:
        rule = parse_entry(text)
    except ConfigError:
        raise ApiError(400, "invalid_host", f"{text[:100]!r} is not a host or host:port") from None
    if rule.wildcard:
        raise ApiError(400, "invalid_host", "per-issue hosts are single hosts, never wildcards")
    return issue_entry(rule.host, rule.port or 443)


def blueprint(kernel: Kernel) -> Blueprint:
    bp = Blueprint("risoluto_egress_decisions", __name__)

    @bp.get("/api/v1/egress/decisions")
    @api("Recent egress decisions, newest first (filters: sandbox, issue, verdict, since, limit)", tags=_TAGS,
         responses={200: {"type": "object", "properties": {"decisions": {"type": "array", "items": DECISION}}}})
    async def decisions() -> Any:
        keep, limit = decision_filter(request.args)
        return {"decisions": [d.to_dict() for d in audit_for(kernel).recent(keep, limit)]}

    @bp.get("/api/v1/egress/decisions/stream")
    @api("Egress decisions as they happen (text/event-stream, one `decision` event each)", tags=_TAGS,
         responses={200: None})
    async def stream() -> Any:
        keep, _ = decision_filter(request.args)
        audit = audit_for(kernel)

        async def events() -> AsyncIterator[bytes]:
            seen = audit.last_seq
            quiet = 0.0
            yield b": risoluto egress decisions\n\n"
            while True:
                fresh = audit.after(seen)
                for seq, decision in fresh:
                    seen = seq
                    if keep(decision):
                        yield (f"id: {seq}\nevent: decision\n"
                               f"data: {json.dumps(decision.to_dict(), ensure_ascii=False)}\n\n").encode()
                        quiet = 0.0
                if quiet >= KEEPALIVE_S:  # a comment line keeps proxies from closing an idle stream
                    yield b": keep-alive\n\n"
                    quiet = 0.0
                await anyio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S

        response = Response(events(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.timeout = None  # a stream stays open until the client leaves
        return response

    @bp.get("/api/v1/egress/approvals")
    @api("Egress requests held while they wait for approval", tags=_TAGS,
         responses={200: {"type": "object", "properties": {"approvals": {"type": "array", "items": APPROVAL}}}})
    async def approvals() -> Any:
        return {"approvals": approvals_for(kernel).list()}

    @bp.post("/api/v1/egress/approvals/<approval_id>")
    @api("Answer a held egress request: allow-once, allow-issue or deny", request=ANSWER, tags=_TAGS,
         responses={200: APPROVAL})
    async def answer(approval_id: str) -> Any:
        body = await json_object()
        choice = body.get("decision")
        if set(body) != {"decision"} or choice not in ANSWERS:
            raise ApiError(400, "invalid_decision", f"Send {{\"decision\": one of {', '.join(ANSWERS)}}}.")
        principal = getattr(g.get("info"), "principal", "") or "unknown"
        pending = approvals_for(kernel).answer(approval_id, choice, principal)
        if pending is None:
            raise ApiError(404, "approval_not_found",
                           "No pending approval has that id (it was answered, timed out, or the server restarted; "
                           "the request was denied).")
        return {**pending.public(), "decision": choice}

    @bp.get("/api/v1/egress/issues/<issue>/hosts")
    @api("Hosts granted to one issue by allow-issue answers", tags=_TAGS, responses={200: ISSUE_HOSTS})
    async def issue_hosts(issue: str) -> Any:
        return {"issue": issue, "hosts": list(issue_hosts_for(kernel).entries(issue))}

    @bp.delete("/api/v1/egress/issues/<issue>/hosts/<host>")
    @api("Remove a host granted to an issue (applies to the next request)", tags=_TAGS, responses={200: ISSUE_HOSTS})
    async def remove_issue_host(issue: str, host: str) -> Any:
        entry = _canonical_host(host)
        store = issue_hosts_for(kernel)
        if not await anyio.to_thread.run_sync(store.remove, issue, entry):
            raise ApiError(404, "host_not_found", f"{entry} is not granted to issue {issue!r}.")
        return {"issue": issue, "hosts": list(store.entries(issue))}

    return bp


class AuditService:
    """Writes out the queued decision lines when the app stops."""

    name = "egress.audit"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        audit = self.kernel.state.get(STATE_KEY)
        if audit is not None:
            await anyio.to_thread.run_sync(audit.close)


@hookimpl
def risoluto_app_blueprints(kernel: Kernel) -> list[Any]:
    return [blueprint(kernel)]


@hookimpl
def risoluto_app_services(kernel: Kernel) -> list[Any]:
    return [AuditService(kernel)]


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    item = "egress audit"
    path = kernel.settings.data_path / LOG_NAME
    audit = kernel.state.get(STATE_KEY)
    if audit is not None and audit.write_error:
        return [CheckResult(item=item, status=FAIL, reason=f"decisions cannot be written: {audit.write_error}; "
                            f"{audit.dropped} line(s) lost", fix=f"make {path.parent} writable by the kernel's user")]
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.W_OK):
            return [CheckResult(item=item, status=FAIL, reason=f"{path} is not a writable regular file",
                                fix=f"make {path} a regular file owned by the kernel's user, mode 0600")]
    except FileNotFoundError:
        pass
    except OSError as exc:
        return [CheckResult(item=item, status=FAIL, reason=f"{path}: {exc.strerror}", fix="fix its permissions")]
    if audit is not None and audit.dropped:
        return [CheckResult(item=item, status=WARN,
                            reason=f"{audit.dropped} decision line(s) were dropped: the audit writer fell behind",
                            fix="put DATA_DIR on a faster disk, or lower the egress load; the count is "
                                "risoluto_egress_audit_dropped_total")]
    return [CheckResult(item=item, status=PASS, reason=f"every egress decision is appended to {path}")]
