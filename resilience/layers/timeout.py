"""Timeout layer: one attempt within its budget (see :mod:`resilience.timeout` for the modes).

Cooperative: the rest of the chain runs here, under the attempt's deadline scope; a late
answer is an ``AttemptTimeout`` (a ``LateResult`` carrying a late result). Abandon: it runs in
the timeout's pool, which holds a bulkhead slot until the work really ends (so the policy
puts no separate bulkhead layer in front of an abandoning timeout).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..chain import Compiled, call_deadline
from ..timeout import COOPERATIVE, Timeout

__all__ = ["TimeoutLayer"]


class TimeoutLayer(Compiled):
    publishes_deadline = True  # the attempt's scope: the nearer of it and the call's deadline

    def __init__(self, timeout: Timeout) -> None:
        self.timeout = timeout
        self.cooperative = timeout.mode == COOPERATIVE

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        if self.cooperative:
            return self.timeout.around(next)
        run_abandon = self.timeout.run_abandon

        def abandon(c: tuple) -> Any:
            return run_abandon(call_deadline(c), next, (c,), {})

        return abandon

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        if self.cooperative:
            return await self.timeout.bounded(next, c)
        return await self.timeout.acall(next, c)  # the abandon mode's slot
