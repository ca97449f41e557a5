"""Adaptive limit layer: the rest of the chain runs under an in-flight slot of the
dependency's :class:`~resilience.adaptive.AdaptiveLimiter`, which learns from how the
attempt went (its duration, or the kind of failure) what the limit should be."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..adaptive import SUCCESS, AdaptiveLimiter, outcome
from ..chain import Call

__all__ = ["AdaptiveLimitLayer"]


class AdaptiveLimitLayer:
    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self.limiter = limiter
        self._now = limiter.clock.now
        self._acquire = limiter.acquire
        self._release = limiter.release

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        self._acquire(c[4])  # c[4]: c.priority
        start = self._now()
        try:
            result = next(c)
        except BaseException as exc:
            self._release(self._now() - start, outcome(exc))
            raise
        self._release(self._now() - start, SUCCESS)
        return result

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        await self.limiter.aacquire(c.priority)
        start = self._now()
        try:
            result = await next(c)
        except BaseException as exc:
            self._release(self._now() - start, outcome(exc))
            raise
        self._release(self._now() - start, SUCCESS)
        return result
