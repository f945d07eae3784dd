"""Egress enforcement for sandboxes with an allowlist (docs/egress.md).

When ``codex.sandbox.egressAllowlist`` is non-empty, the kernel asks
``risoluto_egress_enforcer`` for an enforcer, starts it with the app (a failing start
stops startup), and the launcher calls its ``attach`` for every sandbox launch (after every other
``risoluto_sandbox_spec`` contribution). A launch that no enforcer attached to is
refused: an allowlist is never silently ignored.

The default enforcer (plugin ``egress.network``) is a forward proxy on an internal Docker
network; for every request it sees, it calls ``risoluto_egress_decision`` before
applying the sandbox's allowlist, so a plugin can add a rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..settings import Settings
    from .sandbox import ContainerSpec, LaunchRequest


# Label the kernel puts on a spec once an enforcer attached to it (value: the enforcer's name).
# A launch under an allowlist without it is refused.
EGRESS_LABEL = "risoluto.egress"


@attrs.frozen(kw_only=True)
class EgressRequest:
    """One outbound attempt seen by the enforcer.

    ``host`` is normalised: lower case, no trailing dot, IDNA (punycode) form, or an IP
    address in its canonical text form (IPv6 without brackets). ``path`` is the origin-form
    path with query of a plain-HTTP request, and empty for a CONNECT tunnel (encrypted).
    ``sandbox`` identifies the sandbox for logs (never its credential).
    """

    sandbox: str
    method: str  # CONNECT, GET, ...
    host: str
    port: int
    path: str = ""


@attrs.frozen(kw_only=True)
class EgressApproval:
    """A request held for approval (``egress.onUnlisted: ask``): an unlisted host that passed
    the address checks. ``host`` is normalised as in :class:`EgressRequest`."""

    id: str
    sandbox: str
    issue: str
    host: str
    port: int
    method: str  # CONNECT, or the plain-HTTP method
    asked_at: str  # UTC, ISO 8601


@attrs.frozen
class EgressVerdict:
    allowed: bool
    reason: str


class EgressEnforcer(Protocol):
    """Makes a sandbox's allowlist true.

    ``start`` runs once when the app starts (only with a non-empty allowlist) and may
    raise :class:`~risoluto.errors.StartupError` to stop startup; ``stop`` undoes what it
    set up on the host. ``attach`` edits each launch's spec (network, proxy environment,
    lifecycle callbacks) and may raise :class:`~risoluto.errors.ApiError` to refuse it; it
    must never add a capability. ``status`` feeds the doctor: a dict with at least
    ``bind`` (the address workers reach it on) and ``host_protection`` (one line).
    """

    name: str

    async def start(self, kernel: Kernel) -> None: ...

    async def stop(self) -> None: ...

    def attach(self, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None: ...

    def status(self) -> dict[str, Any]: ...


@hookspec(firstresult=True)
def risoluto_egress_enforcer(kernel: Kernel, settings: Settings) -> EgressEnforcer | None:
    """Return the egress enforcer. Called once at startup by the kernel, only when the allowlist
    is non-empty (or when an overlay sets one); firstresult. The kernel starts it, holds it as
    ``kernel.backends.egress`` and stops it at shutdown; no plugin answering is a startup error
    naming ``codex.sandbox.egressAllowlist``.

    Example::

        @hookimpl(tryfirst=True)
        def risoluto_egress_enforcer(settings):
            return MyFirewallEnforcer(settings)
    """


@hookspec(firstresult=True)
def risoluto_egress_decision(kernel: Kernel, request: EgressRequest, allowlist: tuple[str, ...]) -> EgressVerdict | None:
    """Decide an outbound attempt; the first non-None verdict wins.

    Called by the enforcer for every attempt before the allowlist itself is applied, with
    the requesting sandbox's own allowlist entries as written. Return
    ``EgressVerdict(False, "reason")`` to refuse (the client gets 403 with the reason), a
    True verdict to allow a host the allowlist does not list, or None to leave it to the
    allowlist. Address checks (no private, loopback, link-local or metadata addresses
    unless in ``egress.allowPrivateNetworks``) and the TLS SNI check apply after any
    verdict. Keep it quick and synchronous: it runs on the proxy's event loop. A hook that
    raises refuses the attempt.

    Example (deny a path prefix, allow only GET to one host)::

        @hookimpl
        def risoluto_egress_decision(request, allowlist):
            if request.path.startswith("/upload"):
                return EgressVerdict(False, "uploads are not allowed")
            if request.host == "pypi.org" and request.method not in ("GET", "CONNECT"):
                return EgressVerdict(False, "read-only access to pypi.org")
            return None
    """


@hookspec(firstresult=True)
def risoluto_egress_decide(kernel: Kernel, approval: EgressApproval) -> str | None:
    """Answer a held approval instead of a person; the first non-None answer wins.

    Called once per held request (``egress.onUnlisted: ask``), in a worker thread (it may
    call out, e.g. to a policy service), while the approval is also listed for people at
    ``GET /api/v1/egress/approvals``; whichever answers first decides. Return
    ``"allow-once"`` (this request only), ``"allow-issue"`` (add the host to the issue's
    own allowlist), ``"deny"``, or None to leave it to a person. A decider that raises,
    answers anything else, or has not answered within ``egress.askTimeoutSeconds`` counts
    as a deny (fail closed). Audit lines of a plugin's answer carry principal ``plugin``.

    Example (let an issue's sandboxes reach the company's package mirrors, refuse paste sites)::

        @hookimpl
        def risoluto_egress_decide(approval):
            if approval.host.endswith(".mirror.example.com") and approval.port == 443:
                return "allow-issue"
            if approval.host in ("pastebin.com", "transfer.sh"):
                return "deny"
            return None
    """
