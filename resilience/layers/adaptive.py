"""Adaptive limit layer: the rest of the chain runs under an in-flight slot of the
dependency's :class:`~resilience.adaptive.AdaptiveLimiter`, which learns from how the
attempt went (its duration, or the kind of failure) what the limit should be."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..adaptive import SUCCESS, AdaptiveLimiter, outcome
from ..chain import Compiled

__all__ = ["AdaptiveLimitLayer"]


class AdaptiveLimitLayer(Compiled):
    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self.limiter = limiter

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        now, acquire, release = self.limiter.clock.now, self.limiter.acquire, \
            self.limiter.release

        def adaptive_limit(c: tuple) -> Any:
            acquire(c[4])  # c.priority
            start = now()
            try:
                result = next(c)
            except BaseException as exc:
                release(now() - start, outcome(exc))
                raise
            release(now() - start, SUCCESS)
            return result

        return adaptive_limit

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        await self.limiter.aacquire(c[4])
        now = self.limiter.clock.now
        start = now()
        try:
            result = await next(c)
        except BaseException as exc:
            self.limiter.release(now() - start, outcome(exc))
            raise
        self.limiter.release(now() - start, SUCCESS)
        return result
