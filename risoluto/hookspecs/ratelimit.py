"""Rate limiting: which requests count where, and who counts them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
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


@attrs.frozen
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket has room again (Retry-After when refused)


class RateLimiter(Protocol):
    """A rate-limit backend. ``hit`` is atomic per decision."""

    async def hit(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision: ...

    async def close(self) -> None: ...


@hookspec
def risoluto_ratelimit_rules(settings: Settings) -> list[RateRule]:
    """Contribute rate-limit rules.

    Called once at app creation; collected. The first matching rule (in plugin order)
    applies to a request; a request that matches no rule is not limited.

    Example::

        @hookimpl
        def risoluto_ratelimit_rules(settings):
            return [RateRule(bucket="exports", limit=10, window_seconds=60, prefixes=("/api/v1/export",))]
    """


@hookspec(firstresult=True)
def risoluto_ratelimit_backend(settings: Settings) -> RateLimiter | None:
    """Return the rate-limit backend named by ``rateLimit.backend``, or None if it is not yours.

    Called once at app creation; firstresult. If no plugin answers, startup fails
    with a message naming the backend.

    Example::

        @hookimpl
        def risoluto_ratelimit_backend(settings):
            if settings.rate_limit.backend == "redis":
                return RedisLimiter(...)
            return None
    """
