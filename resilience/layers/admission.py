"""Admission layers: refuse a call before it costs anything (rate limit, load shedding)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..chain import Call
from ..ratelimit import RateLimiter
from ..shedding import LoadShedder

__all__ = ["RateLimitLayer", "SheddingLayer"]


class RateLimitLayer:
    """One GCRA permit per call, keyed by the call's ``client`` (``"-"`` when none)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        self.limiter.acquire(c.client or "-")
        return next(c)

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        self.limiter.acquire(c.client or "-")
        return await next(c)


class SheddingLayer:
    """Admit the call by its priority under the current load, or raise ``Shed``."""

    def __init__(self, shedder: LoadShedder) -> None:
        self.shedder = shedder

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        self.shedder.admit(c.priority)
        return next(c)

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        self.shedder.admit(c.priority)
        return await next(c)
