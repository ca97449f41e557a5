"""Rate-limit state: GCRA (a token bucket stored as one timestamp, the "theoretical arrival
time") in process memory or in Redis (``lua/gcra.lua``: one atomic script call)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["MemoryGcraOps", "RateLimitStore", "RedisGcraOps"]


@runtime_checkable
class RateLimitStore(Protocol):
    def gcra(self, key: str, rate: float, burst: int, cost: int = 1) -> tuple[bool, float]:
        """Generic cell rate algorithm: (allowed, retry_after seconds)."""


class MemoryGcraOps:
    """GCRA in process memory, behind the store's lock."""

    _tat: dict[str, float]

    def gcra(self, key, rate, burst, cost=1):
        interval = 1.0 / rate
        with self._lock:
            now = self.clock.now()
            tat = max(self._tat.get(key, now), now)
            new_tat = tat + interval * cost
            excess = new_tat - now - interval * burst
            if excess > 1e-9:
                return False, excess
            self._tat[key] = new_tat
            return True, 0.0


class RedisGcraOps:
    """GCRA in Redis (needs the Redis store's plumbing, as :class:`RedisBreakerOps`)."""

    def gcra(self, key, rate, burst, cost=1):
        def remote():
            raw = self._script("gcra")(
                keys=[self.key("ratelimit", key)],
                args=[self._now_arg(), repr(1.0 / rate), burst, cost],
            )
            return bool(int(raw[0])), float(raw[1])

        return self._run("gcra", remote, lambda: self.fallback.gcra(key, rate, burst, cost))
