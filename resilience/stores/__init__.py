"""Where breakers, rate limiters and retry budgets keep their state, split by pattern.

=================  ==================  ===================  ===========================
pattern            module              memory               Redis
=================  ==================  ===================  ===========================
circuit breaker    :mod:`.breaker`     ``MemoryBreakerOps`` ``lua/breaker.lua``
rate limit (GCRA)  :mod:`.ratelimit`   ``MemoryGcraOps``    ``lua/gcra.lua``
retry budget       :mod:`.retry_budget` ``MemoryBudgetOps`` ``lua/retry_budget.lua``
fallback cache     :mod:`.cache`       ``MemoryCache``      ``RedisCache``
=================  ==================  ===================  ===========================

:class:`MemoryStore` (one process, :mod:`.memory`) and :class:`RedisStore` (every worker and
producer sees one state, with a degraded mode, :mod:`.redis_store`) each combine the three
patterns' operations into one :class:`StateStore`. Everything is re-exported here, so
``from resilience.stores import RedisStore, redis_client`` keeps working.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .breaker import (
    BUCKETS_PER_WINDOW,
    HALF_OPEN_BUSY_RETRY_AFTER,
    BreakerParams,
    BreakerSnapshot,
    BreakerStore,
)
from .cache import Cache, CacheEntry, MemoryCache, RedisCache
from .memory import MemoryStore
from .ratelimit import RateLimitStore
from .redis_store import RedisStore, redis_client
from .retry_budget import RetryBudgetStore

__all__ = [
    "BUCKETS_PER_WINDOW",
    "HALF_OPEN_BUSY_RETRY_AFTER",
    "BreakerParams",
    "BreakerSnapshot",
    "BreakerStore",
    "Cache",
    "CacheEntry",
    "MemoryCache",
    "MemoryStore",
    "RateLimitStore",
    "RedisCache",
    "RedisStore",
    "RetryBudgetStore",
    "StateStore",
    "redis_client",
]


@runtime_checkable
class StateStore(BreakerStore, RateLimitStore, RetryBudgetStore, Protocol):
    """Atomic operations on shared resilience state. Times come from the store's own clock."""

    name: str
