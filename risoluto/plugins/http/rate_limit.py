"""Rate limiting (docs/http-security.md, "Rate limiting"): the ``api`` and ``webhooks`` buckets,
the in-memory backend (the kernel selects the backend and holds it, with the rules, as
``kernel.backends.limiter`` / ``rate_rules``), and its tracked-clients gauge.

The in-memory backend is a sliding window of sub-window counters. A window W is cut into
``SUBWINDOWS`` (10) sub-windows of g = W/10 seconds, aligned to the bucket's creation. Per
(bucket, client) the limiter keeps how many requests it admitted in each of the last 11
sub-windows (the current one and the 10 before it), and admits a request only while their sum is
below the limit L. Every request admitted in an interval of length W ending at an admitted
request lies in those 11 sub-windows (they cover the last W + up to g seconds), so:

- no interval of length W ever admits more than L requests from one client, whatever the timing
  (a fixed window admits 2L around its edge; a GCRA with burst L admits 2L in its first window);
- L requests at once pass and the next is refused; ``remaining`` reaches 0 on the last admitted one;
- the price of counting whole sub-windows: a request leaves the count when its sub-window is 11
  sub-windows old, between W and W + g = 1.1 W after it was admitted, so a client may wait up to
  10% longer than the window for its next request.

Compact state: the 11 counters of a client are packed, with the index of the newest sub-window,
into ONE Python int (``index << 11*b | counters``, b = bits of L; the newest counter in the low
bits). Moving to a later sub-window is one shift; the sum of the counters is one multiplication
(``counters * (1 + 2^b + ... + 2^10b)`` holds the sum in its 11th field: every partial sum is at
most L < 2^b, so nothing carries). About 150 bytes per tracked client, key included.

Idle expiry without scanning: each bucket keeps two generations of clients, ``cur`` and ``prev``.
Every 10 sub-windows ``prev`` is dropped and ``cur`` becomes ``prev``; a client seen again moves
back to ``cur``. A dropped client's newest counter is at least 11 sub-windows old, so all its
counters had expired: forgetting it changes no decision. The number of tracked clients is capped
(``rateLimit.maxClients``, all buckets together); at the cap the oldest generation of the biggest
bucket is dropped early (those clients start afresh: fail-open for accuracy under a flood of
distinct addresses, never a refusal of newcomers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.ratelimit import RateDecision, RateRule, client_group
from risoluto.settings import Settings

log = logging.getLogger("risoluto.rate_limit")

SUBWINDOWS = 10  # per window: a client waits at most W/SUBWINDOWS longer than the window
SLOTS = SUBWINDOWS + 1  # counters kept per client: the current sub-window and the 10 before it


class _Bucket:
    __slots__ = ("limit", "window", "granule", "per_second", "origin", "bits", "mask", "index_shift", "counters_mask",
                 "summer", "sum_shift", "cur", "prev", "rotate_at")

    def __init__(self, limit: int, window: float, now: float, carried_from: _Bucket | None = None):
        self.limit = limit
        self.window = float(window)
        self.granule = self.window / SUBWINDOWS
        self.per_second = SUBWINDOWS / self.window  # sub-windows per second: a multiplication per decision
        self.origin = now
        self.bits = limit.bit_length()  # a counter, and any sum of counters, is at most limit
        self.mask = (1 << self.bits) - 1
        self.index_shift = SLOTS * self.bits
        self.counters_mask = (1 << self.index_shift) - 1
        self.summer = sum(1 << (i * self.bits) for i in range(SLOTS))
        self.sum_shift = (SLOTS - 1) * self.bits
        self.cur: dict[str, int] = {}
        self.prev: dict[str, int] = {}
        self.rotate_at = SUBWINDOWS
        if carried_from is not None:
            self._carry(carried_from, now)

    def _carry(self, old: _Bucket, now: float) -> None:
        """A reconfigured bucket (new limit or window) keeps what each client used: its count
        in the old window becomes one count in the first new sub-window. That errs on the
        strict side (the count leaves the window later than it would have), never lets a change
        of limits hand every client a fresh budget."""
        index = int((now - old.origin) * old.per_second)
        for generation in (old.prev, old.cur):
            for key, state in generation.items():
                age = index - (state >> old.index_shift)
                if age >= SLOTS:
                    continue
                counters = state & old.counters_mask
                if age > 0:
                    counters = (counters << (age * old.bits)) & old.counters_mask
                used = ((counters * old.summer) >> old.sum_shift) & old.mask
                if used:
                    self.cur[key] = min(used, self.limit)  # sub-window 0, the low field

    def rotate(self, index: int) -> None:
        if index >= self.rotate_at + SUBWINDOWS:
            self.prev = {}  # both generations are older than a window: all expired
        else:
            self.prev = self.cur
        self.cur = {}
        self.rotate_at = index + SUBWINDOWS

    def ends(self, index: int) -> float:
        """When sub-window ``index``'s requests leave the count (it is then 11 sub-windows old)."""
        return self.origin + (index + SLOTS) * self.granule

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)


class MemoryLimiter:
    """Sliding window of sub-window counters in process memory (see the module docstring).
    ``hit`` never awaits, so each decision is atomic."""

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
            b = self._buckets[bucket] = _Bucket(limit, window_seconds, now, carried_from=b)  # new or reconfigured
        index = int((now - b.origin) * b.per_second)  # the current sub-window's number
        if index >= b.rotate_at:
            b.rotate(index)
        # client_group's own fast path, inlined: most clients are IPv4 and not loopback
        key = client if ":" not in client and not client.startswith("127.") else client_group(client)
        cur = b.cur
        state = cur.get(key)
        if state is None:
            state = b.prev.pop(key, None)
            if state is None:
                if self.tracked() >= self.max_clients:
                    self._make_room()
                    cur = b.cur
                state = index << b.index_shift
        counters = state & b.counters_mask
        age = index - (state >> b.index_shift)
        if age:
            if age > 0:  # later sub-window: shift the counters up; those 11 or more old fall out
                counters = (counters << (age * b.bits)) & b.counters_mask if age < SLOTS else 0
            else:  # the clock went back (a test clock): stay in the newer sub-window
                index -= age
            state = (index << b.index_shift) | counters
        used = ((counters * b.summer) >> b.sum_shift) & b.mask
        if used >= limit:
            cur[key] = state
            return RateDecision(False, limit, 0, self._retry_after(b, index, counters, used) - now)
        cur[key] = state + 1  # the current sub-window's counter is the low field: no carry, it is < limit
        return RateDecision(True, limit, limit - used - 1, b.origin + (index + SLOTS) * b.granule - now)

    @staticmethod
    def _retry_after(b: _Bucket, index: int, counters: int, used: int) -> float:
        """When enough of the oldest counted requests have left for one more to pass.

        Field j of ``counters * summer`` is the number of requests in slots 0..j (the newest
        j + 1 sub-windows). Once slot s and every older one have left the count, field s - 1
        is what remains: walk from the oldest slot in use towards the newest until that is
        below the limit (usually the first step: a burst sits in one or two sub-windows)."""
        prefix = counters * b.summer
        bits, mask, limit = b.bits, b.mask, b.limit
        slot = (counters.bit_length() - 1) // bits  # the oldest sub-window with a count in it
        while slot > 0 and (prefix >> ((slot - 1) * bits)) & mask >= limit:
            slot -= 1
        return b.ends(index - slot)

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
    """Exports the in-memory limiter's tracked clients; the kernel chose the limiter and the rules
    (``kernel.backends.limiter`` / ``rate_rules``) and closes it."""

    name = "http.rate_limit"

    def __init__(self, kernel: Any):
        self.kernel = kernel

    async def start(self) -> None:
        limiter = self.kernel.backends.limiter
        if isinstance(limiter, MemoryLimiter):
            _tracked_gauge(self.kernel).set_function(limiter.tracked)

    async def stop(self) -> None:
        pass


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
    if (kernel.backends.limiter is None and rl.backend != "memory"
            and kernel.hooks.ratelimit_backend(kernel.settings) is None):
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
