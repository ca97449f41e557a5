"""Deadline layer: the call's total budget, counted from when it enters this layer; an
enclosing tighter deadline wins.

The deadline rides down in the call (``c.deadline``, an ``(expires_at, clock)`` pair) and is
published to the callee once, by the layer that bounds the attempt (the timeout layer
publishes the nearer of the attempt's expiry and this) or, without one, by the end of the
chain; a retry layer publishes it while it waits between attempts. Publishing it here as
well would set the context variable twice per call, and a :class:`~resilience.deadline.
Deadline` (a named tuple) costs several times a plain pair to build: the pair becomes one
only where it is published.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .. import deadline as _deadline
from ..chain import Compiled
from ..clock import SYSTEM_CLOCK, Clock
from ..timeout import check_timeout

__all__ = ["DeadlineLayer"]

_get = _deadline._current.get


class DeadlineLayer(Compiled):
    sets_deadline = True

    def __init__(self, seconds: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.seconds = check_timeout(seconds, "deadline")
        self.clock = clock

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        seconds, clock, now = self.seconds, self.clock, self.clock.now

        def deadline(c: tuple) -> Any:
            expires = now() + seconds
            outer = c[7] or _get()  # c.deadline, or the published one
            if outer is not None and outer[0] <= expires:  # the enclosing one is tighter
                if outer is c[7]:
                    return next(c)
                return next((*c[:7], outer))
            return next((*c[:7], (expires, clock)))

        return deadline

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        with _deadline.deadline_scope(self.seconds, clock=self.clock):
            return await next(c)
