"""Egress enforcement for sandboxes with an allowlist."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..settings import Settings


@attrs.frozen(kw_only=True)
class EgressRequest:
    """One outbound attempt seen by the enforcer."""

    sandbox: str
    method: str  # CONNECT, GET, ...
    host: str
    port: int
    path: str = ""


@attrs.frozen
class EgressVerdict:
    allowed: bool
    reason: str


class EgressEnforcer(Protocol):
    """Makes a sandbox's allowlist true. ``attach`` edits the spec before launch."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@hookspec(firstresult=True)
def risoluto_egress_enforcer(settings: Settings) -> EgressEnforcer | None:
    """Return the egress enforcer. Called once at startup; firstresult.

    Example::

        @hookimpl
        def risoluto_egress_enforcer(settings):
            return MyFirewallEnforcer(settings)
    """


@hookspec(firstresult=True)
def risoluto_egress_decision(request: EgressRequest, allowlist: tuple[str, ...]) -> EgressVerdict | None:
    """Decide an outbound attempt; the first non-None verdict wins.

    Called by the enforcer for every attempt before the allowlist itself is applied.
    Return ``EgressVerdict(False, "reason")`` to refuse, a True verdict to allow, or None
    to leave it to the allowlist.

    Example::

        @hookimpl
        def risoluto_egress_decision(request, allowlist):
            if request.host == "uploads.example.org":
                return EgressVerdict(False, "uploads are not allowed")
            return None
    """
