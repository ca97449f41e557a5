"""Total time budget for a call, readable by everything it calls.

The budget lives in a context variable so code deep inside a task (an HTTP client, a Redis
client) can size its own socket timeouts with :func:`client_timeout` instead of waiting
longer than the caller is prepared to. Works across threads started with
``contextvars.copy_context()`` and across asyncio tasks.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from .clock import SYSTEM_CLOCK, Clock
from .errors import ConfigError, DeadlineExceeded

__all__ = [
    "Deadline",
    "as_deadline",
    "client_timeout",
    "current",
    "deadline_scope",
    "new_deadline",
    "remaining",
]


class Deadline(NamedTuple):
    """An absolute expiry on a monotonic clock. Immutable.

    A named tuple rather than a frozen dataclass: the chain creates one per call, and a
    frozen dataclass's ``__init__`` costs about four times as much (see bench/guard_overhead).
    """

    expires_at: float
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def after(cls, seconds: float, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        if seconds is None or not seconds > 0:
            raise ConfigError(f"deadline must be a positive number of seconds, got {seconds!r}")
        return cls(clock.now() + float(seconds), clock)

    @classmethod
    def from_epoch(cls, epoch_seconds: float, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        """Rebuild a deadline sent across processes as wall-clock time (e.g. a task header)."""
        return cls(clock.now() + (float(epoch_seconds) - time.time()), clock)

    def to_epoch(self) -> float:
        """Wall-clock expiry, to hand a deadline to another process."""
        return time.time() + self.remaining()

    def remaining(self) -> float:
        """Seconds left, never below 0."""
        return max(0.0, self.expires_at - self.clock.now())

    @property
    def expired(self) -> bool:
        return self.clock.now() >= self.expires_at

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` if the budget is spent."""
        if self.expired:
            raise DeadlineExceeded("deadline exceeded: time budget spent")

    def tighter(self, other: Deadline | None) -> Deadline:
        if other is None:
            return self
        return self if self.expires_at <= other.expires_at else other


def new_deadline(expires_at: float, clock: Clock) -> Deadline:
    """``Deadline(expires_at, clock)`` without the keyword handling: for the chain's hot path."""
    return _tuple_new(Deadline, (expires_at, clock))


_tuple_new = tuple.__new__

# What is published: a Deadline, or the chain's plain ``(expires_at, clock)`` pair in the
# same shape (the timeout layer publishes one per attempt, and a named tuple costs several
# times a plain one to build); read it through current(), which always gives a Deadline.
_current: contextvars.ContextVar[tuple[float, Clock] | None] = contextvars.ContextVar(
    "tidegate_deadline", default=None
)


def as_deadline(d: tuple[float, Clock] | None) -> Deadline | None:
    """A published ``(expires_at, clock)`` pair as a :class:`Deadline` (None stays None)."""
    return d if d is None or type(d) is Deadline else _tuple_new(Deadline, d)


def current() -> Deadline | None:
    """The deadline in force here, if any."""
    return as_deadline(_current.get())


def remaining() -> float | None:
    """Seconds left of the current budget, ``None`` when no deadline is set."""
    d = _current.get()
    return None if d is None else max(0.0, d[0] - d[1].now())


@contextmanager
def deadline_scope(budget: float | Deadline, *, clock: Clock = SYSTEM_CLOCK) -> Iterator[Deadline]:
    """Run the block under a budget; an enclosing tighter deadline wins (never extends it)."""
    new = budget if isinstance(budget, Deadline) else Deadline.after(budget, clock)
    effective = new.tighter(current())
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)


def client_timeout(default: float, floor: float = 0.001) -> float:
    """A client/socket timeout that follows the budget: ``min(default, remaining)``.

    Raises :class:`DeadlineExceeded` when the budget is already spent, so callers never start
    I/O they cannot wait for. ``floor`` keeps the result usable by clients that reject 0.
    """
    if default is None or not default > 0:
        raise ConfigError(f"client timeout default must be > 0 seconds, got {default!r}")
    d = _current.get()
    if d is None:
        return float(default)
    left = d[0] - d[1].now()  # expires_at - clock.now(): a Deadline or a published pair
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded before the client call started")
    return max(floor, min(float(default), left))
