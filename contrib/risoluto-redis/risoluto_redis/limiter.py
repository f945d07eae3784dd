"""Rate limiting in Redis: one Lua script per decision, so every decision is atomic across any
number of kernel instances sharing the server.

Same algorithm, numbers and guarantee as the kernel's in-memory backend
(``risoluto/plugins/http/rate_limit.py``): a sliding window of sub-window counters. The window W
is cut into 10 sub-windows of g = W/10; per (bucket, client group) a Redis hash holds how many
requests were admitted in each sub-window (field = the sub-window's number, counted from the
Unix epoch on the Redis server's clock). A request is admitted only while the counts of the
current sub-window and the 10 before it add up to less than the limit L. So no interval of
length W ever admits more than L requests from one client, across every instance; L at once
pass and the next is refused; a request leaves the count between W and 1.1 W after it was
admitted (a client waits at most 10% longer than the window).

Choices the in-memory backend does not have to make:
- The clock is the Redis server's (``TIME`` inside the script), never an instance's, so
  instances whose clocks disagree still share one timeline and one set of sub-windows.
- Counts that left the window are deleted by the script that meets them, and the hash expires
  (``PEXPIRE``) when its newest count leaves the window: an expired key and an absent one mean
  the same thing, so idle clients cost no memory and expiry changes no decision. Refusals do
  not count.
- A key left by the earlier GCRA version of this plugin (a string, not a hash) is read as an
  empty hash and replaced, so an upgrade never answers with Redis' WRONGTYPE error. A count
  whose sub-window lies in the future (the window was made longer, so sub-windows have other
  numbers) is dropped like an expired one.
- Failures (connection refused, timeout, script error) propagate from ``hit``: the kernel
  then answers 503 ``rate_limiter_unavailable`` (or lets reads through with
  ``rateLimit.failOpen``). A retried command after a lost reply may count one request
  twice, which errs on the side of refusing.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from risoluto.hookspecs.ratelimit import RateDecision, client_group

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "risoluto:ratelimit:"
SUBWINDOWS = 10  # as the in-memory backend: a client waits at most 10% past the window

# KEYS[1]: the client's hash {sub-window number: admitted count}. ARGV: limit, window (µs),
# sub-windows per window. Returns {allowed (0/1), remaining, reset (µs, as a string: Redis
# truncates Lua numbers)}; reset is, when allowed, the time until the full limit is back and,
# when refused, the time until the next request is admitted.
WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local granule = tonumber(ARGV[2]) / n
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = math.floor(now / granule)
local flat = redis.pcall('HGETALL', KEYS[1])
if flat.err then
  redis.call('DEL', KEYS[1])
  flat = {}
end
local used, live, stale = 0, {}, {}
for i = 1, #flat, 2 do
  local index = tonumber(flat[i])
  if index < current - n or index > current then  -- left the window, or counted in another window size
    stale[#stale + 1] = flat[i]
  else
    local count = tonumber(flat[i + 1])
    used = used + count
    live[#live + 1] = {index, count}
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
if used >= limit then
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, entry in ipairs(live) do
    freed = freed + entry[2]
    if used - freed < limit then
      return {0, 0, string.format('%.17g', (entry[1] + n + 1) * granule - now)}
    end
  end
  return {0, 0, string.format('%.17g', (current + n + 1) * granule - now)}
end
redis.call('HINCRBY', KEYS[1], string.format('%.0f', current), 1)
local reset = (current + n + 1) * granule - now
redis.call('PEXPIRE', KEYS[1], math.ceil(reset / 1000))
return {1, limit - used - 1, string.format('%.17g', reset)}
"""


def redact_url(url: str) -> str:
    """The URL without its password, for messages and the doctor."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisLimiter:
    """The ``redis`` rate-limit backend. Building it does no I/O; connections are lazy.

    Decisions that arrive in the same event-loop turn are sent together as one pipeline of
    EVALSHA calls (one write, one read; each script still runs atomically on its own), so
    the Python client's per-command cost is paid once per batch: under load this is what
    bounds throughput, not Redis. A lone request waits one loop turn.
    """

    name = "redis"
    max_batch = 256

    def __init__(self, url: str = DEFAULT_URL, prefix: str = DEFAULT_PREFIX, *, max_connections: int = 64,
                 timeout: float = 1.0):
        self.url = url
        self.location = redact_url(url)
        self.prefix = prefix
        # Bounded pool: a flood of batches waits (up to ``timeout``) for a connection rather
        # than opening thousands; a slow or dead server costs at most ~2 x ``timeout`` per
        # request (one retry, for a connection dropped by a server restart). URL query
        # parameters (e.g. ?socket_timeout=0.2) override these defaults.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout,
            socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 1),
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.sha = hashlib.sha1(WINDOW_LUA.encode()).hexdigest()
        self._pending: list[tuple[str, int, str, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def key(self, bucket: str, client: str) -> str:
        return f"{self.prefix}{bucket}:{client_group(client)}"

    async def hit(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision:
        if limit < 1 or not window_seconds > 0 or math.isinf(window_seconds):
            raise ValueError(f"invalid rate limit {limit} per {window_seconds} s")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((self.key(bucket, client), limit, f"{window_seconds * 1e6:.17g}", future))
        if len(self._pending) == 1:  # first of this turn: flush once the turn's other hits are queued
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        allowed, remaining, reset_us = await future
        return RateDecision(bool(allowed), limit, int(remaining), max(0.0, float(reset_us) / 1e6))

    async def _flush(self) -> None:
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
        if self._pending:  # more than one batch queued: the rest goes in its own pipeline
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            results = await self._evalsha_all(batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:  # script cache flushed (restart, failover, SCRIPT FLUSH): load it, run those again
                await self.redis.script_load(WINDOW_LUA)
                for i, r in zip(missing, await self._evalsha_all([batch[i] for i in missing]), strict=True):
                    results[i] = r
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RedisError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # the request went away meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _evalsha_all(self, batch: list[tuple[str, int, str, asyncio.Future[Any]]]) -> list[Any]:
        if len(batch) == 1:  # nothing to batch: a plain command is cheaper than a pipeline
            key, limit, window_us, _ = batch[0]
            try:
                return [await self.redis.evalsha(self.sha, 1, key, limit, window_us, SUBWINDOWS)]
            except NoScriptError as exc:
                return [exc]
        pipe = self.redis.pipeline(transaction=False)  # not MULTI: each script is atomic by itself
        for key, limit, window_us, _ in batch:
            pipe.evalsha(self.sha, 1, key, limit, window_us, SUBWINDOWS)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        await self.redis.aclose(close_connection_pool=True)
