"""Rate limiting (SPEC 2.4): the ``api`` and ``webhooks`` buckets, the in-memory backend,
and the service that installs ``kernel.limiter`` / ``kernel.rate_rules`` at startup.

The in-memory backend is GCRA (generic cell rate algorithm): one float per
(bucket, client), the "theoretical arrival time" (TAT). With limit L per window W a request
costs T = W/L seconds of TAT and is allowed while TAT - now stays within W. So:
- L requests at once are allowed and the (L+1)-th is refused (exact; no float drift);
- there is no window edge: in ANY interval of length d at most L + d/T requests pass,
  so the fixed-window 2L burst around an edge cannot happen;
- a client whose TAT is in the past is indistinguishable from a new one, so idle
  clients can be forgotten without changing any decision.

Idle expiry without scanning: each bucket keeps two generations of clients, ``cur`` and
``prev``. Every W seconds ``prev`` is dropped and ``cur`` becomes ``prev``; a client seen
again is moved back to ``cur``. Entries dropped this way were last updated more than W
ago, so their TAT is in the past: expiry is exact. The number of tracked clients is capped
(``rateLimit.maxClients``, all buckets together); at the cap the oldest generation of the
biggest bucket is dropped early (those clients start afresh: fail-open for accuracy under
a flood of distinct addresses, never a refusal of newcomers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from risoluto.errors import StartupError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.ratelimit import RateDecision, RateRule, client_group
from risoluto.settings import Settings

log = logging.getLogger("risoluto.rate_limit")

# a millionth of one request's cost absorbs float rounding in TAT sums, never a request
_EPS = 1e-6


class _Bucket:
    __slots__ = ("limit", "window", "interval", "cur", "prev", "rotated_at")

    def __init__(self, limit: int, window: float, now: float):
        self.limit = limit
        self.window = float(window)
        self.interval = self.window / limit
        self.cur: dict[str, float] = {}
        self.prev: dict[str, float] = {}
        self.rotated_at = now

    def rotate(self, now: float) -> None:
        if now - self.rotated_at >= 2 * self.window:
            self.prev = {}  # everything is older than a window: all expired
            self.cur = {}
        else:
            self.prev = self.cur
            self.cur = {}
        self.rotated_at = now

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)


class MemoryLimiter:
    """GCRA in process memory. ``hit`` never awaits, so each decision is atomic."""

    name = "memory"

    def __init__(self, max_clients: int = 1_000_000, clock: Any = time.monotonic):
        self.max_clients = max_clients
        self.clock = clock
        self.evicted = 0
        self._buckets: dict[str, _Bucket] = {}

    def tracked(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    async def hit(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision:
        return self.decide(bucket, client, limit, window_seconds)

    def decide(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision:
        now = self.clock()
        b = self._buckets.get(bucket)
        if b is None or b.limit != limit or b.window != window_seconds:
            b = self._buckets[bucket] = _Bucket(limit, window_seconds, now)  # new or reconfigured
        elif now - b.rotated_at >= b.window:
            b.rotate(now)
        key = client_group(client)
        tat = b.cur.get(key)
        if tat is None:
            tat = b.prev.pop(key, None)
            if tat is None and self.tracked() >= self.max_clients:
                self._make_room()
        interval, window = b.interval, b.window
        start = now if tat is None or tat < now else tat
        new_tat = start + interval
        if new_tat - now > window + interval * _EPS:
            if tat is not None:
                b.cur[key] = tat
            retry = start + interval - window - now
            return RateDecision(False, limit, 0, max(retry, 0.0))
        b.cur[key] = new_tat
        remaining = int((window - (new_tat - now)) / interval + _EPS)
        return RateDecision(True, limit, max(0, min(limit, remaining)), new_tat - now)

    def _make_room(self) -> None:
        """Drop the oldest generation of the biggest bucket (see the module docstring)."""
        victim = max(self._buckets.values(), key=len)
        if victim.prev:
            dropped, victim.prev = len(victim.prev), {}
        else:
            dropped, victim.cur = len(victim.cur), {}
        self.evicted += dropped
        log.warning("rate limiter at maxClients=%d: forgot %d clients early", self.max_clients, dropped)

    async def close(self) -> None:
        self._buckets.clear()


def rules(settings: Settings) -> list[RateRule]:
    rl = settings.rate_limit
    return [
        RateRule(bucket="api", limit=rl.api.limit, window_seconds=rl.api.window_seconds,
                 prefixes=("/api/",), paths=("/api", "/metrics")),
        RateRule(bucket="webhooks", limit=rl.webhooks.limit, window_seconds=rl.webhooks.window_seconds,
                 prefixes=("/webhooks/",), paths=("/webhooks",)),
    ]


@hookimpl
def risoluto_ratelimit_rules(settings: Settings) -> list[RateRule]:
    return rules(settings)


@hookimpl
def risoluto_ratelimit_backend(settings: Settings) -> MemoryLimiter | None:
    if settings.rate_limit.backend != "memory":
        return None
    return MemoryLimiter(settings.rate_limit.max_clients)


class RateLimitService:
    """Installs the backend and the rules on the kernel for the app's lifetime."""

    name = "http.rate_limit"

    def __init__(self, kernel: Any):
        self.kernel = kernel

    async def start(self) -> None:
        k = self.kernel
        backend = k.hooks.ratelimit_backend(k.settings)
        if backend is None:
            raise StartupError(
                f"rateLimit.backend {k.settings.rate_limit.backend!r}: no plugin provides this backend "
                "(built in: memory; install the plugin that provides it, e.g. risoluto-redis)"
            )
        k.rate_rules = k.hooks.ratelimit_rules(k.settings)
        k.limiter = backend
        if isinstance(backend, MemoryLimiter):
            _tracked_gauge(k).set_function(backend.tracked)

    async def stop(self) -> None:
        limiter, self.kernel.limiter = self.kernel.limiter, None
        if limiter is not None:
            await limiter.close()


def _tracked_gauge(kernel: Any) -> Any:
    from prometheus_client import Gauge

    gauge = kernel.state.get("http.rate_limit.gauge")
    if gauge is None:
        gauge = kernel.state["http.rate_limit.gauge"] = Gauge(
            "risoluto_ratelimit_tracked_clients", "Clients currently tracked by the in-memory rate limiter",
            registry=kernel.metrics_registry,
        )
    return gauge


@hookimpl
def risoluto_app_services(kernel: Any) -> list[Any]:
    return [RateLimitService(kernel)]


def _per_minute(limit: int, window: float) -> float:
    return limit * 60.0 / window


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    item = "Rate limiting"
    rl = kernel.settings.rate_limit
    if kernel.limiter is None and rl.backend != "memory" and kernel.hooks.ratelimit_backend(kernel.settings) is None:
        return [CheckResult(item=item, status=FAIL, reason=f"no plugin provides rateLimit.backend {rl.backend!r}",
                            fix="set rateLimit.backend: memory, or install the backend's plugin")]
    summary = (f"api {rl.api.limit}/{rl.api.window_seconds:g}s, webhooks {rl.webhooks.limit}/"
               f"{rl.webhooks.window_seconds:g}s per client, backend {rl.backend}, maxClients {rl.max_clients}")
    looser = [name for name, b, published in (("api", rl.api, 300), ("webhooks", rl.webhooks, 600))
              if _per_minute(b.limit, b.window_seconds) > published or b.limit > published]
    if looser:
        return [CheckResult(item=item, status=WARN, reason=f"looser than the published limits ({', '.join(looser)}): "
                            + summary, fix="use api 300/60s and webhooks 600/60s (the defaults)")]
    if rl.fail_open:
        return [CheckResult(item=item, status=WARN, reason="reads pass when the backend fails (failOpen): " + summary,
                            fix="set rateLimit.failOpen: false")]
    return [CheckResult(item=item, status=PASS, reason=summary)]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["rate limiting"]
