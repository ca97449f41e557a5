"""Rate-limit state: GCRA (a token bucket stored as one timestamp, the "theoretical arrival
time") in process memory or in Redis (``lua/gcra.lua``: one atomic script call)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["MemoryGcraOps", "RateLimitStore", "RedisGcraOps"]


@runtime_checkable
class RateLimitStore(Protocol):
    def gcra(self, key: str, rate: float, burst: int, cost: int = 1) -> tuple[bool, float]:
        """Generic cell rate algorithm: (allowed, retry_after seconds)."""

    def gcra_many(self, requests: list[tuple[str, float, int, int]]
                  ) -> list[tuple[bool, float]]:
        """:meth:`gcra` for several (key, rate, burst, cost), in order, each decided alone."""


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

    def gcra_many(self, requests):
        return [self.gcra(*r) for r in requests]


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

    def gcra_many(self, requests):
        """One round trip for all (a pipeline of the script; each call still atomic on its
        own key), where the client pipelines scripts: not on Redis Cluster, whose keys may
        live on several nodes (one call each there)."""
        import redis

        if len(requests) < 2 or not isinstance(self.client, redis.Redis):
            return [self.gcra(*r) for r in requests]

        def remote():
            pipe = self.client.pipeline(transaction=False)
            script = self._script("gcra")
            now = self._now_arg()
            for key, rate, burst, cost in requests:
                script(keys=[self.key("ratelimit", key)],
                       args=[now, repr(1.0 / rate), burst, cost], client=pipe)
            return [(bool(int(raw[0])), float(raw[1])) for raw in pipe.execute()]

        return self._run("gcra", remote,
                         lambda: [self.fallback.gcra(*r) for r in requests])
