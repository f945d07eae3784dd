"""Rate limiting: which requests count where, and who counts them."""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING, NamedTuple, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..settings import Settings


@attrs.frozen(kw_only=True)
class RateRule:
    """Requests whose path starts with one of ``prefixes`` (or equals one of ``paths``) share a bucket."""

    bucket: str
    limit: int
    window_seconds: float
    prefixes: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def matches(self, path: str) -> bool:
        return path in self.paths or any(path.startswith(p) for p in self.prefixes)


class RateDecision(NamedTuple):
    """One decision. Immutable; a NamedTuple rather than a frozen attrs class because one is
    built for every limited request, and a frozen attrs class costs four times as much to build
    (bench/ratelimit.py)."""

    allowed: bool
    limit: int
    remaining: int  # how many more would be admitted now (0 on the last admitted request)
    reset_seconds: float  # allowed: until the full limit is back; refused: until the next is admitted


LOOPBACK_GROUP = "127.0.0.1"
_IPV6_LOOPBACK = bytes(15) + b"\x01"


def client_group(client: str) -> str:
    """The key a client is counted under: an IPv4 address as is, an IPv6 address as its /64
    (one host usually owns a whole /64), IPv4-mapped IPv6 as IPv4, and every loopback address
    (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) as ``127.0.0.1``: all of them are this one machine.
    Anything that is not an IP address is its own key. Every backend should use this."""
    if ":" not in client:
        if client.startswith("127."):
            try:
                socket.inet_pton(socket.AF_INET, client)
            except OSError:
                return client
            return LOOPBACK_GROUP
        return client
    return _ipv6_group(client)


@functools.lru_cache(maxsize=4096)  # a client sends many requests: parse its address once
def _ipv6_group(client: str) -> str:
    try:
        packed = socket.inet_pton(socket.AF_INET6, client.split("%", 1)[0])
    except (OSError, ValueError):
        return client
    if packed == _IPV6_LOOPBACK:
        return LOOPBACK_GROUP
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return client_group(socket.inet_ntop(socket.AF_INET, packed[12:]))  # an IPv4 client
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class RateLimiter(Protocol):
    """A rate-limit backend. ``hit`` is atomic per decision.

    ``client`` is the decided client address; the backend groups it with
    :func:`client_group`. ``remaining`` is how many more requests would be allowed right
    now; ``reset_seconds`` is, for an allowed request, the time until the full ``limit`` is
    available again and, for a refused one, the time until the next request is allowed.
    """

    async def hit(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision: ...

    async def close(self) -> None: ...


@hookspec
def risoluto_ratelimit_rules(kernel: Kernel, settings: Settings) -> list[RateRule]:
    """Contribute rate-limit rules.

    Called once at app creation; collected. The first matching rule (in plugin order)
    applies to a request; a request that matches no rule is not limited.

    Example::

        @hookimpl
        def risoluto_ratelimit_rules(settings):
            return [RateRule(bucket="exports", limit=10, window_seconds=60, prefixes=("/api/v1/export",))]
    """


@hookspec(firstresult=True)
def risoluto_ratelimit_backend(kernel: Kernel, settings: Settings) -> RateLimiter | None:
    """Return the rate-limit backend named by ``rateLimit.backend``, or None if it is not yours.

    Called once at startup by the kernel, which holds the answer as ``kernel.backends.limiter``
    and closes it at shutdown; firstresult. If no plugin answers, startup fails with a message
    naming ``rateLimit.backend``.

    Example::

        @hookimpl
        def risoluto_ratelimit_backend(settings):
            if settings.rate_limit.backend == "redis":
                return RedisLimiter(...)
            return None
    """
