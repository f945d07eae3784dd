"""risoluto-redis: the ``redis`` rate-limit backend (``rateLimit.backend: redis``)."""

from .limiter import RedisLimiter

__all__ = ["RedisLimiter"]
