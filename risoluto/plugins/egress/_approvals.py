"""Operator approvals for unlisted hosts (``egress.onUnlisted: ask``) and per-issue allowlists.

A held request opens a :class:`Pending` approval and waits, up to
``egress.askTimeoutSeconds``, for the first answer: a person (``POST
/api/v1/egress/approvals/{id}``) or a ``risoluto_egress_decide`` plugin, whichever answers
first. Everything that is not an explicit allow is a deny: the timeout, a decider that
raises or answers nonsense, the server stopping (``cancel_all``), an id nobody knows.
Pending approvals live in memory only and are bounded per sandbox and in total, so a worker
asking for a thousand hosts holds at most ``PER_SANDBOX`` of them.

``allow-issue`` adds the host to that issue's own allowlist, kept in
``<DATA_DIR>/egress-issue-hosts.json`` (0600, replaced atomically) and consulted by the
proxy for every sandbox of that issue, this one and the next.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
import attrs
from anyio.lowlevel import RunVar

from risoluto.errors import ConfigError
from risoluto.fsutil import atomic_write
from risoluto.hookspecs.egress import EgressApproval

from ._hosts import Allowlist, IPAddress, parse_entry

if TYPE_CHECKING:
    from ._metrics import EgressMetrics

log = logging.getLogger("risoluto.egress")

ANSWERS = ("allow-once", "allow-issue", "deny")
PER_SANDBOX = 16
TOTAL = 256
MAX_ISSUE_HOSTS = 1000
ISSUE_HOSTS_NAME = "egress-issue-hosts.json"
# the audit reason of each way a held request ends
REASONS = {"allow-once": "approved_once", "allow-issue": "approved_for_issue", "deny": "approval_denied"}


_DECIDERS: RunVar[anyio.CapacityLimiter] = RunVar("risoluto_egress_deciders")
DECIDER_THREADS = 16


def _deciders() -> anyio.CapacityLimiter:
    try:
        return _DECIDERS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DECIDER_THREADS)
        _DECIDERS.set(limiter)
        return limiter


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@attrs.define(eq=False, kw_only=True)
class Pending:
    id: str
    sandbox: str
    issue: str
    host: str
    port: int
    method: str
    asked_at: str
    expires_at: str
    answer: str = ""  # one of ANSWERS once answered
    reason: str = ""  # the audit reason of the outcome
    principal: str = ""
    done: anyio.Event = attrs.field(factory=anyio.Event)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "sandbox": self.sandbox, "issue": self.issue or None, "host": self.host,
                "port": self.port, "asked_at": self.asked_at, "expires_at": self.expires_at}

    def settle(self, answer: str, reason: str, principal: str) -> bool:
        """Record the first answer; later ones are ignored (False)."""
        if self.answer:
            return False
        self.answer, self.reason, self.principal = answer, reason, principal
        self.done.set()
        return True


class Approvals:
    def __init__(self, metrics: EgressMetrics | None = None, per_sandbox: int = PER_SANDBOX, total: int = TOTAL):
        self._metrics = metrics
        self.per_sandbox = per_sandbox
        self.total = total
        self._pending: dict[str, Pending] = {}

    def open(self, sandbox: str, issue: str, host: str, port: int, method: str, timeout: float) -> Pending | None:
        """A new pending approval, or None when this sandbox or the whole queue is full."""
        mine = sum(1 for p in self._pending.values() if p.sandbox == sandbox)
        if mine >= self.per_sandbox or len(self._pending) >= self.total:
            return None
        at = datetime.now(timezone.utc)
        pending = Pending(id="apr-" + secrets.token_hex(8), sandbox=sandbox, issue=issue, host=host, port=port,
                          method=method, asked_at=_stamp(at), expires_at=_stamp(at + timedelta(seconds=timeout)))
        self._pending[pending.id] = pending
        self._gauge()
        return pending

    async def wait(self, pending: Pending, timeout: float, decide: Callable[[EgressApproval], Any] | None,
                   client_left: Callable[[], Awaitable[None]] | None = None) -> None:
        """Until the first answer, the timeout, or ``client_left`` returning (the requester gave
        up: its slot is freed at once); ``pending`` then holds the outcome."""

        async def watch() -> None:
            assert client_left is not None
            await client_left()
            pending.settle("deny", "client_gone", "")

        try:
            with anyio.move_on_after(timeout):
                async with anyio.create_task_group() as tg:
                    if decide is not None:
                        tg.start_soon(self._ask_plugins, pending, decide)
                    if client_left is not None:
                        tg.start_soon(watch)
                    await pending.done.wait()
                    tg.cancel_scope.cancel()
            pending.settle("deny", "approval_timeout", "")
        finally:
            self._pending.pop(pending.id, None)
            self._gauge()

    async def _ask_plugins(self, pending: Pending, decide: Callable[[EgressApproval], Any]) -> None:
        approval = EgressApproval(id=pending.id, sandbox=pending.sandbox, issue=pending.issue, host=pending.host,
                                  port=pending.port, method=pending.method, asked_at=pending.asked_at)
        try:
            # a thread: a decider may call out (a policy service) without stalling the proxy
            # own threads: a hanging decider never takes the ones the rest of the kernel uses
            answer = await anyio.to_thread.run_sync(decide, approval, abandon_on_cancel=True, limiter=_deciders())
        except Exception as exc:  # a broken decider denies (fail closed)
            log.error("risoluto_egress_decide raised %s; %s is denied", type(exc).__name__, pending.host)
            pending.settle("deny", "decider_error", "plugin")
            return
        if answer is None:
            return  # no plugin answered: a person may
        if answer not in ANSWERS:
            log.error("risoluto_egress_decide answered %r (not one of %s); denied", answer, ", ".join(ANSWERS))
            pending.settle("deny", "decider_error", "plugin")
            return
        pending.settle(answer, REASONS[answer], "plugin")

    def answer(self, approval_id: str, answer: str, principal: str) -> Pending | None:
        """Answer a pending approval; None when the id is unknown (expired, answered, never asked)."""
        pending = self._pending.get(approval_id)
        if pending is None or not pending.settle(answer, REASONS[answer], principal):
            return None
        return pending

    def list(self) -> list[dict[str, Any]]:
        """Pending approvals, oldest first (answered ones are gone even before their request resumes)."""
        return [p.public() for p in sorted(self._pending.values(), key=lambda p: p.asked_at) if not p.answer]

    def cancel_all(self) -> None:
        """The server is stopping: every held request is denied."""
        for pending in list(self._pending.values()):
            pending.settle("deny", "approval_cancelled", "")

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.pending_approvals.set(len(self._pending))


def issue_entry(host: str | IPAddress, port: int) -> str:
    """The allowlist entry an ``allow-issue`` answer adds: the host, with its port unless 80/443."""
    text = f"[{host}]" if isinstance(host, ipaddress.IPv6Address) else str(host)
    return text if port in (80, 443) else f"{text}:{port}"


class IssueHosts:
    """Per-issue allowlists granted by ``allow-issue``: ``{"issues": {issue: [entry, ...]}}``."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._issues: dict[str, list[str]] = self._load()
        self._lists: dict[str, Allowlist] = {}
        self.generation = 0  # bumped on every change: judgements that relied on the grants expire

    def _load(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            issues = data["issues"]
            return {str(k): [parse_entry(e).entry for e in v] for k, v in issues.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            # fail closed: an unreadable file grants nothing (and is not overwritten until a change)
            log.error("egress: %s is unreadable (%s); no per-issue hosts are allowed", self.path, exc)
            return {}

    def entries(self, issue: str) -> tuple[str, ...]:
        return tuple(self._issues.get(issue, ()))

    def allowlist(self, issue: str) -> Allowlist | None:
        entries = self._issues.get(issue)
        if not entries:
            return None
        cached = self._lists.get(issue)
        if cached is None or cached.entries != tuple(entries):
            cached = self._lists[issue] = Allowlist(entries)
        return cached

    def add(self, issue: str, entry: str) -> bool:
        """Add (and save) ``entry``; False if it was there already. Blocking: call from a thread."""
        with self._lock:
            current = self._issues.get(issue, [])
            if entry in current:
                return False
            if len(current) >= MAX_ISSUE_HOSTS:
                raise ValueError(f"issue {issue!r} already has {MAX_ISSUE_HOSTS} granted hosts")
            self._save({**self._issues, issue: [*current, entry]})
            return True

    def remove(self, issue: str, entry: str) -> bool:
        """Remove (and save) ``entry``; False if it was not there. Blocking: call from a thread."""
        with self._lock:
            current = self._issues.get(issue, [])
            if entry not in current:
                return False
            rest = [e for e in current if e != entry]
            issues = {k: v for k, v in self._issues.items() if k != issue}
            if rest:
                issues[issue] = rest
            self._save(issues)
            return True

    def _save(self, issues: dict[str, list[str]]) -> None:
        data = json.dumps({"issues": issues}, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")
        atomic_write(self.path, data, 0o600)
        self._issues = issues  # only once it is on disk
        self.generation += 1


__all__ = ["ANSWERS", "Approvals", "IssueHosts", "Pending", "issue_entry"]


def approvals_for(kernel: Any) -> Approvals:
    """The kernel's pending approvals (one set per kernel, in memory: a restart forgets them)."""
    from ._metrics import metrics_for

    found = kernel.state.get("egress.approvals")
    if found is None:
        found = kernel.state["egress.approvals"] = Approvals(metrics_for(kernel))
    return found


def issue_hosts_for(kernel: Any) -> IssueHosts:
    """The kernel's per-issue allowlists, loaded from DATA_DIR on first use."""
    found = kernel.state.get("egress.issue_hosts")
    if found is None:
        found = kernel.state["egress.issue_hosts"] = IssueHosts(kernel.settings.data_path / ISSUE_HOSTS_NAME)
    return found
