"""The plugin the kernel loads through the ``risoluto`` entry point ``redis``.

Selected by ``rateLimit.backend: redis``; the server comes from ``RISOLUTO_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``) and keys are named ``RISOLUTO_REDIS_PREFIX``
(default ``risoluto:ratelimit:``) + ``<bucket>:<client group>``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from risoluto.addresses import is_loopback_bind
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.settings import Settings

from .limiter import RedisLimiter, key_prefix, redact_url, redis_url

BACKEND = "redis"
ITEM = "Rate limiting: Redis backend"


@hookimpl
def risoluto_ratelimit_backend(settings: Settings) -> RedisLimiter | None:
    if settings.rate_limit.backend != BACKEND:
        return None
    return RedisLimiter(redis_url(), key_prefix())


def _probe(url: str, timeout: float = 1.0) -> str:
    """PING with the sync client (the doctor hook is synchronous); returns the server version."""
    # no retries: the doctor runs inside request handling too, and must answer quickly
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                  retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.rate_limit.backend != BACKEND:
        return []
    url = redis_url()  # os.environ, as the backend hook (which only gets settings) reads it
    where = redact_url(url)
    try:
        version = _probe(url)
    except (redis.RedisError, OSError, ValueError) as exc:
        return [CheckResult(
            item=ITEM, status=FAIL,
            reason=f"Redis at {where} is unreachable ({type(exc).__name__}: {exc}); limited routes answer 503",
            fix="start redis-server, or point RISOLUTO_REDIS_URL at a reachable server",
        )]
    parts = urlsplit(url)
    if parts.scheme == "redis" and not is_loopback_bind(parts.hostname or ""):
        return [CheckResult(
            item=ITEM, status=WARN,
            reason=f"Redis {version} at {where} is reached without TLS over the network",
            fix="use a rediss:// URL (TLS), or keep Redis on a private network",
        )]
    return [CheckResult(item=ITEM, status=PASS,
                        reason=f"Redis {version} reachable at {where}; limits shared by every instance using it")]
