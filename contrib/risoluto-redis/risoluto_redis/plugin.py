"""The plugin the kernel loads through the ``risoluto`` entry point ``redis``.

Selected by ``rateLimit.backend: redis``. Its settings are ``plugins.settings.redis`` in the config
file: ``url`` (default ``redis://127.0.0.1:6379/0``) and ``prefix`` (default ``risoluto:ratelimit:``;
keys are named prefix + ``<bucket>:<client group>``). ``RISOLUTO_REDIS_URL`` and
``RISOLUTO_REDIS_PREFIX`` override them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from risoluto.addresses import is_loopback_bind
from risoluto.errors import ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.settings import Settings

from .limiter import DEFAULT_PREFIX, DEFAULT_URL, RedisLimiter, redact_url

BACKEND = "redis"
ITEM = "Rate limiting: Redis backend"
NAME = "redis"  # the entry point's name: this plugin's settings are plugins.settings.redis
# setting -> (the environment variable that overrides it, the default)
SETTINGS = {"url": ("RISOLUTO_REDIS_URL", DEFAULT_URL), "prefix": ("RISOLUTO_REDIS_PREFIX", DEFAULT_PREFIX)}
SCHEMES = ("redis", "rediss", "unix")


def option(kernel: Any, key: str) -> str:
    """The environment's override, else the config file's value, else the default."""
    variable, default = SETTINGS[key]
    override = (kernel.environ.get(variable) or "").strip()
    return override or str(kernel.plugin_settings(NAME).get(key) or "").strip() or default


@hookimpl
def risoluto_settings_validate(settings: Settings) -> None:
    section = settings.plugins.settings.get(NAME, {})
    for key, value in sorted(section.items()):
        where = f"plugins.settings.{NAME}.{key}"
        if key not in SETTINGS:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(SETTINGS)})")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: expected a non-empty string")
    url = section.get("url")
    if url is not None and urlsplit(url).scheme not in SCHEMES:
        raise ConfigError(f"plugins.settings.{NAME}.url: must be a redis://, rediss:// or unix:// URL")


@hookimpl
def risoluto_ratelimit_backend(kernel: Any, settings: Settings) -> RedisLimiter | None:
    if settings.rate_limit.backend != BACKEND:
        return None
    return RedisLimiter(option(kernel, "url"), option(kernel, "prefix"))


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
    url = option(kernel, "url")
    where = redact_url(url)
    try:
        version = _probe(url)
    except (redis.RedisError, OSError, ValueError) as exc:
        return [CheckResult(
            item=ITEM, status=FAIL,
            reason=f"Redis at {where} is unreachable ({type(exc).__name__}: {exc}); limited routes answer 503",
            fix="start redis-server, or point plugins.settings.redis.url at a reachable server",
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
