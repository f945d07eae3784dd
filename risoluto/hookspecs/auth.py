"""Request authorization and the client address."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..errors import ApiError
    from ..settings import Settings


@attrs.define(kw_only=True)
class RequestInfo:
    """What the kernel knows about a request before routing it.

    ``path`` is the path the router matches (already percent-decoded by the ASGI
    server). ``route`` is the matched rule (``/api/v1/secrets/<key>``) or None for a
    404/405. ``client`` is decided once by the client-address hook and used by every
    guard, the limiter and the logs. ``principal`` is set by the authorizing guard.

    The kernel also records, as typed fields: ``norm_path`` (the matched rule, or the
    normalised path of an unmatched request: what guards and rate rules judge), ``started``
    (``time.perf_counter()`` at arrival), the rate decision (``rate_bucket``, ``rate_limited``
    True on a 429, ``rate_headers``), ``refused`` (the code of an authorization refusal, empty
    if none) and ``admitted`` (set by the guard that admitted a request needing authorization:
    the write guard for a mutating request, the data plane for its callers; the write audit
    records exactly those). ``extra`` is for third-party plugins: namespace keys with your
    plugin's name.
    """

    method: str
    path: str
    route: str | None
    headers: Any  # a case-insensitive multi-dict (werkzeug Headers)
    peer: str
    client: str = ""
    via_proxy: bool = False
    principal: str = ""
    request_id: str = ""
    norm_path: str = ""
    started: float = 0.0
    rate_bucket: str = ""
    rate_limited: bool = False
    rate_headers: tuple[tuple[str, str], ...] = ()
    refused: str = ""
    admitted: bool = False
    completed: bool = False
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def mutating(self) -> bool:
        return self.method not in ("GET", "HEAD", "OPTIONS")


@hookspec(firstresult=True)
def risoluto_client_address(kernel: Kernel, info: RequestInfo, settings: Settings) -> tuple[str, bool] | None:
    """Decide the client address of a request.

    Called once per request before rate limiting and authorization. firstresult: the
    first plugin that returns ``(address, via_proxy)`` decides. ``via_proxy`` is True when
    the address came from a trusted proxy's ``X-Forwarded-For`` (such a client is never
    loopback). Return None to let another plugin decide; if none does the socket peer is used.

    Example::

        @hookimpl
        def risoluto_client_address(info, settings):
            return (info.peer, False)
    """


@hookspec(firstresult=True)
def risoluto_request_authorize(kernel: Kernel, info: RequestInfo, settings: Settings) -> ApiError | None:
    """Refuse a request, or let it pass.

    Called once per request after rate limiting, before the route runs. firstresult: the
    first plugin that returns an :class:`~risoluto.errors.ApiError` refuses the request with
    it; None means "no objection". A guard that lets a request through may set
    ``info.principal`` (``"loopback"`` or ``"token"``; the default guards also use ``"session"``
    for a console session cookie and ``"sign-in"`` for the console's sign-in route).

    Example::

        @hookimpl
        def risoluto_request_authorize(info, settings):
            if info.path.startswith("/api/v1/admin") and info.client != "10.0.0.5":
                return ApiError(403, "admin_only", "Admin routes are for the admin host.")
            return None
    """


@hookspec
def risoluto_request_completed(kernel: Kernel, info: RequestInfo, status: int, seconds: float) -> None:
    """Observe a finished request (audit logs, metrics).

    Called after the response is built, for every request, refused ones included.
    Collected; return values are ignored. Must not raise and must be quick (it runs on
    the request path); queue slow work.

    Example::

        @hookimpl
        def risoluto_request_completed(info, status, seconds):
            print(info.method, info.path, status)
    """
