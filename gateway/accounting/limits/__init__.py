"""Per-key limits: requests and tokens per minute, concurrency, and budgets.

``MemoryLimiter`` serves one replica; ``RedisLimiter`` is shared by all replicas of a deployment.
Both raise ``gateway.errors.ApiError`` with status 429 (``rate_limit_exceeded`` or
``insufficient_quota``), or 503 when Redis cannot be reached.
"""

from gateway.accounting.limits.base import Admission, Limiter, SpendLoader, format_reset, period_start
from gateway.accounting.limits.memory import MemoryLimiter
from gateway.accounting.limits.redis_limiter import RedisLimiter

__all__ = [
    "Admission",
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "SpendLoader",
    "format_reset",
    "period_start",
]
