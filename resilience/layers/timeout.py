"""Timeout layer: one attempt within its budget (see :mod:`resilience.timeout` for the modes).

Cooperative: the rest of the chain runs here, under the attempt's deadline scope; a late
answer is an ``AttemptTimeout`` (a ``LateResult`` carrying a late result). Abandon: it runs in
the timeout's pool, which holds a bulkhead slot until the work really ends (so the policy
puts no separate bulkhead layer in front of an abandoning timeout).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..chain import Call
from ..timeout import COOPERATIVE, Timeout

__all__ = ["TimeoutLayer"]


class TimeoutLayer:
    def __init__(self, timeout: Timeout) -> None:
        self.timeout = timeout
        self.cooperative = timeout.mode == COOPERATIVE
        if self.cooperative:
            # the call's deadline rides in ``c`` (published once, there, if it is the
            # nearer); run_inline has a layer's signature, so it is this layer's call
            self.call = timeout.run_inline  # type: ignore[method-assign]

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        """The abandon mode (the cooperative one is ``Timeout.run_inline``, set above)."""
        return self.timeout.run_abandon(c.deadline, next, (c,), {})

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        if self.cooperative:
            return await self.timeout.bounded(next, c)
        return await self.timeout.acall(next, c)  # the abandon mode's slot
