"""Per-key rate limiting with GCRA (a token bucket stored as one timestamp).

``rate`` requests per second on average, up to ``burst`` at once. With the memory store the
limit is per process; with :class:`resilience.stores.RedisStore` it is global (one Lua call,
one round trip, per decision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigError, RateLimited
from .events import EVENTS, EventBus, Rejected
from .stores import MemoryStore, StateStore

__all__ = ["RateLimitConfig", "RateLimiter"]


@dataclass(frozen=True)
class RateLimitConfig:
    rate: float  # requests per second, sustained
    burst: int = 1  # requests allowed at once

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(f"rate limit rate must be > 0 per second, got {self.rate!r}")
        if not (isinstance(self.burst, int) and self.burst >= 1):
            raise ConfigError(f"rate limit burst must be an integer >= 1, got {self.burst!r}")


class RateLimiter:
    """A named limiter; ``key`` separates callers (client id, API key, IP)."""

    def __init__(
        self,
        name: str,
        config: RateLimitConfig,
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        events: EventBus = EVENTS,
    ) -> None:
        self.name = name
        self.events = events
        self.config = config
        self.store: StateStore = store if store is not None else MemoryStore(clock)

    def try_acquire(self, key: str = "-", cost: int = 1) -> tuple[bool, float]:
        """(allowed, retry_after seconds). Never raises for being limited."""
        if cost > self.config.burst:
            raise ConfigError(f"rate limit cost {cost} exceeds burst {self.config.burst}")
        return self.store.gcra(f"{self.name}:{key}", self.config.rate, self.config.burst, cost)

    def try_acquire_many(self, keys: list[str]) -> list[tuple[bool, float]]:
        """:meth:`try_acquire` (cost 1) for each of ``keys`` in order, in one store call (one
        Redis round trip): a batch of requests from many clients."""
        return self.store.gcra_many([(f"{self.name}:{key}", self.config.rate,
                                      self.config.burst, 1) for key in keys])

    def refusal(self, key: str, retry_after: float) -> RateLimited:
        """The error (and event) of a refused :meth:`try_acquire`."""
        self.events.emit(Rejected(self.name, RateLimited.reason, retry_after))
        return RateLimited(f"{self.name}: rate limited key {key!r}",
                           retry_after=retry_after, dependency=self.name)

    def acquire(self, key: str = "-", cost: int = 1) -> None:
        """Return if allowed, else raise :class:`RateLimited` with ``retry_after``."""
        allowed, retry_after = self.try_acquire(key, cost)
        if not allowed:
            raise self.refusal(key, retry_after)
