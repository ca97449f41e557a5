"""Deadline layer: the call's total budget, counted from when it enters this layer; an
enclosing tighter deadline wins.

The deadline rides down in the call (``c.deadline``) and is published to the callee once, by
the layer that bounds the attempt (the timeout layer publishes the nearer of the attempt's
expiry and this) or, without one, by the end of the chain; a retry layer publishes it while
it waits between attempts. Publishing it here as well would set the context variable twice
per call, which costs more than the rest of the layer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .. import deadline as _deadline
from ..chain import Call
from ..clock import SYSTEM_CLOCK, Clock
from ..timeout import check_timeout

__all__ = ["DeadlineLayer"]

Deadline = _deadline.Deadline
_tuple_new = tuple.__new__
_get = _deadline._current.get


class DeadlineLayer:
    def __init__(self, seconds: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.seconds = check_timeout(seconds, "deadline")
        self.clock = clock
        self._now = clock.now

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        expires = self._now() + self.seconds
        outer = c[7] or _get()  # c.deadline, or the published one
        if outer is not None and outer.expires_at <= expires:
            d = outer  # the enclosing deadline is the tighter one
        else:
            d = _tuple_new(Deadline, (expires, self.clock))  # deadline.new_deadline, inlined
        return next(_tuple_new(Call, (*c[:7], d)))

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        with _deadline.deadline_scope(self.seconds, clock=self.clock):
            return await next(c)
