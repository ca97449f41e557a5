"""Admission layers: refuse a call before it costs anything (rate limit, load shedding)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..chain import Compiled
from ..ratelimit import RateLimiter
from ..shedding import LoadShedder

__all__ = ["RateLimitLayer", "SheddingLayer"]


class RateLimitLayer(Compiled):
    """One GCRA permit per call, keyed by the call's ``client`` (``"-"`` when none)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        acquire = self.limiter.acquire

        def rate_limit(c: tuple) -> Any:
            acquire(c[5] or "-")  # c.client
            return next(c)

        return rate_limit

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        self.limiter.acquire(c[5] or "-")
        return await next(c)


class SheddingLayer(Compiled):
    """Admit the call by its priority under the current load, or raise ``Shed``."""

    def __init__(self, shedder: LoadShedder) -> None:
        self.shedder = shedder

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        admit = self.shedder.admit

        def shedding(c: tuple) -> Any:
            admit(c[4])  # c.priority
            return next(c)

        return shedding

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        self.shedder.admit(c[4])
        return await next(c)
