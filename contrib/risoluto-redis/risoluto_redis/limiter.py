"""GCRA rate limiting in Redis: one Lua script per decision, so every decision is atomic
across any number of kernel instances sharing the server.

Same algorithm and numbers as the kernel's in-memory backend
(``risoluto/plugins/http/rate_limit.py``): one value per (bucket, client group), the
"theoretical arrival time" (TAT). With limit L per window W a request costs T = W/L of TAT
and is allowed while TAT - now stays within W: L requests at once pass, the (L+1)-th is
refused, and no interval of length d ever lets more than L + d/T through (no 2L burst at
a window edge, since there is no window edge).

Choices the in-memory backend does not have to make:
- The clock is the Redis server's (``TIME`` inside the script), never an instance's, so
  instances whose clocks disagree still share one timeline.
- Times are microseconds held as Lua doubles and stored with 17 significant digits, so a
  value read back is the exact double written (``tostring`` would keep only 14).
- The key expires (``SET ... PX``) when its TAT falls into the past: an expired key and an
  absent one mean the same thing, so idle clients cost no memory and expiry changes no
  decision. Refusals do not write.
- Failures (connection refused, timeout, script error) propagate from ``hit``: the kernel
  then answers 503 ``rate_limiter_unavailable`` (or lets reads through with
  ``rateLimit.failOpen``). A retried command after a lost reply may count one request
  twice, which errs on the side of refusing.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from risoluto.hookspecs.ratelimit import RateDecision, client_group

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "risoluto:ratelimit:"
# a millionth of one request's cost absorbs float rounding (as the in-memory backend)
EPS = 1e-6

# KEYS[1]: the TAT key. ARGV: limit, window (µs), eps.
# Returns {allowed (0/1), remaining, reset (µs, as a string: Redis truncates Lua numbers)}.
GCRA_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local eps = tonumber(ARGV[3])
local interval = window / limit
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
local start = now
if tat and tat > now then start = tat end
local new_tat = start + interval
if new_tat - now > window + interval * eps then
  return {0, 0, string.format('%.17g', start + interval - window - now)}
end
local ttl_ms = math.ceil((new_tat - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
local remaining = math.floor((window - (new_tat - now)) / interval + eps)
if remaining < 0 then remaining = 0 end
if remaining > limit then remaining = limit end
return {1, remaining, string.format('%.17g', new_tat - now)}
"""


def redis_url(environ: Any = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("RISOLUTO_REDIS_URL") or "").strip() or DEFAULT_URL


def key_prefix(environ: Any = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("RISOLUTO_REDIS_PREFIX") or "").strip() or DEFAULT_PREFIX


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
        self.sha = hashlib.sha1(GCRA_LUA.encode()).hexdigest()
        self._eps = repr(EPS)
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
                await self.redis.script_load(GCRA_LUA)
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
                return [await self.redis.evalsha(self.sha, 1, key, limit, window_us, self._eps)]
            except NoScriptError as exc:
                return [exc]
        pipe = self.redis.pipeline(transaction=False)  # not MULTI: each script is atomic by itself
        for key, limit, window_us, _ in batch:
            pipe.evalsha(self.sha, 1, key, limit, window_us, self._eps)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        await self.redis.aclose(close_connection_pool=True)
