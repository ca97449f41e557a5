"""Fallbacks: what a call returns when the dependency is unavailable.

Small strategy objects, composed in order with ``|`` (``CachedValue(...) | DefaultValue([])``):
the first one that can serve wins. They trigger on circuit open, bulkhead full, deadline
exceeded, retries exhausted and other transient errors; never on a permanent error (the
request itself is wrong, a stale answer would hide it).

Results are typed so callers can render them: :class:`Unavailable` (fail gracefully) and
:class:`Deferred` (queued for later). Queue-for-later never loses a request silently: if the
sink cannot store it, the next strategy runs, and if none is left, :class:`DeferralError`.

A replayed request that fails again is deferred again, and carries its history along: the
code that replays it runs it under :func:`replay_lineage`, so the new entry keeps the count
and the time of the first deferral. Past ``max_deferrals`` the request is not deferred again
(:class:`NoFallback`): the error surfaces and the caller's own handling (a worker's
dead-letter queue) takes it, instead of a request cycling between SQS and the work queue.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import (
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    DeferralError,
    RateLimited,
    Shed,
    TidegateError,
)
from .events import EVENTS, DeferralAttempted, EventBus
from .stores import Cache

__all__ = [
    "CachedValue",
    "CallContext",
    "DefaultValue",
    "DeferralSink",
    "Deferred",
    "DeferredRequest",
    "Fallback",
    "FallbackChain",
    "Graceful",
    "MemoryDeferralSink",
    "NoFallback",
    "QueueForLater",
    "Unavailable",
    "default_cache_key",
    "replay_lineage",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallContext:
    """What a fallback may know about the call it stands in for."""

    dependency: str
    task: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    priority: int = 1


@dataclass(frozen=True)
class Unavailable:
    """'Fail gracefully': a result the caller renders instead of an error page.

    ``outcome`` says what is known: ``"not_attempted"`` (refused before any attempt reached
    the dependency: nothing happened there) or ``"unknown"`` (an attempt reached it, or may
    have: a timeout, an error answer; the effect may have happened)."""

    dependency: str
    reason: str
    message: str
    outcome: str = "unknown"


# Refusals raised before a request leaves the process. InProgress is a refusal too, but
# from the dependency itself, about an earlier request that may well have taken effect.
NOT_REACHED = (CircuitOpen, BulkheadFull, RateLimited, Shed)


def nothing_reached(error: BaseException) -> bool:
    """True only when no attempt of the call reached the dependency: a refusal before the
    first attempt (a refusal of a retry, after an attempt went out, does not count)."""
    return isinstance(error, NOT_REACHED) and not getattr(error, "after_attempts", 0)


@dataclass(frozen=True)
class Deferred:
    """'Queue for later': the request was stored under ``id`` and will be replayed."""

    id: str
    dependency: str


@dataclass(frozen=True)
class DeferredRequest:
    """Everything needed to replay a call once the dependency recovers."""

    dependency: str
    task: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    priority: int = 1
    reason: str = ""
    first_deferred_at: float = field(default_factory=time.time)
    deferrals: int = 1


@dataclass(frozen=True)
class _Lineage:
    deferrals: int
    first_deferred_at: float


_lineage: contextvars.ContextVar[_Lineage | None] = contextvars.ContextVar(
    "tidegate_replay_lineage", default=None
)


@contextlib.contextmanager
def replay_lineage(deferrals: int, first_deferred_at: float | None) -> Iterator[None]:
    """Run a replayed request knowing it was deferred ``deferrals`` times, first at
    ``first_deferred_at`` (epoch seconds): a new deferral continues that history."""
    first = float(first_deferred_at) if first_deferred_at else time.time()
    token = _lineage.set(_Lineage(max(0, int(deferrals)), first))
    try:
        yield
    finally:
        _lineage.reset(token)


@runtime_checkable
class DeferralSink(Protocol):
    """A queue-for-later store (the SQS one lives in workers/)."""

    def defer(self, request: DeferredRequest) -> str:
        """Store the request and return its id; raise DeferralError if it was NOT stored."""


class MemoryDeferralSink:
    """An in-process sink for tests and single-process demos."""

    def __init__(self) -> None:
        self.requests: dict[str, DeferredRequest] = {}
        self._lock = threading.Lock()

    def defer(self, request: DeferredRequest) -> str:
        rid = uuid.uuid4().hex
        with self._lock:
            self.requests[rid] = request
        return rid


class NoFallback(TidegateError):
    """Raised by a strategy that cannot serve this call: the next one is tried."""


class Fallback:
    """Base strategy. ``recover`` returns a stand-in result or raises :class:`NoFallback`."""

    kind = "none"

    def recover(self, ctx: CallContext, error: BaseException) -> Any:
        raise NoFallback(f"{ctx.dependency}: no fallback")

    def on_success(self, ctx: CallContext, result: Any) -> None:
        """Called with every successful result (the cached fallback stores it)."""

    @property
    def sees_successes(self) -> bool:
        """Whether :meth:`on_success` does anything: the fallback layer skips building its
        context on every success when it does not."""
        return type(self).on_success is not Fallback.on_success

    def __or__(self, other: Fallback) -> FallbackChain:
        return FallbackChain((*_items(self), *_items(other)))


def _items(f: Fallback) -> tuple[Fallback, ...]:
    return f.strategies if isinstance(f, FallbackChain) else (f,)


class FallbackChain(Fallback):
    """Strategies tried in order."""

    def __init__(self, strategies: tuple[Fallback, ...]) -> None:
        self.strategies = tuple(strategies)
        self.kind = "|".join(s.kind for s in self.strategies)

    def recover(self, ctx: CallContext, error: BaseException) -> Any:
        last: BaseException | None = None
        for s in self.strategies:
            try:
                return s.recover(ctx, error)
            except (NoFallback, DeferralError) as exc:
                last = exc
        assert last is not None
        raise last

    def on_success(self, ctx: CallContext, result: Any) -> None:
        for s in self.strategies:
            s.on_success(ctx, result)

    @property
    def sees_successes(self) -> bool:
        return any(s.sees_successes for s in self.strategies)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.strategies))


def default_cache_key(ctx: CallContext) -> str:
    """Dependency, task and arguments: one cached answer per distinct call."""
    kw = ",".join(f"{k}={v!r}" for k, v in sorted(ctx.kwargs.items()))
    return f"{ctx.dependency}:{ctx.task}:{ctx.args!r}:{kw}"


class CachedValue(Fallback):
    """Serve the last good answer, if it is at most ``ttl`` seconds old."""

    kind = "cached"

    def __init__(
        self, cache: Cache, ttl: float, key: Callable[[CallContext], str] = default_cache_key
    ) -> None:
        from .timeout import check_timeout

        self.cache = cache
        self.ttl = check_timeout(ttl, "cached fallback ttl")
        self.key = key

    def on_success(self, ctx: CallContext, result: Any) -> None:
        self.cache.set(self.key(ctx), result, self.ttl)

    def recover(self, ctx: CallContext, error: BaseException) -> Any:
        entry = self.cache.get(self.key(ctx))
        if entry is None or entry.age > self.ttl:
            raise NoFallback(f"{ctx.dependency}: no cached value within {self.ttl:g}s")
        return entry.value

    def __repr__(self) -> str:
        return f"CachedValue(ttl={self.ttl:g})"


class DefaultValue(Fallback):
    """A default/empty answer; pass a factory (``list``) for mutable values."""

    kind = "default"

    def __init__(self, value_or_factory: Any = None) -> None:
        self.value_or_factory = value_or_factory

    def recover(self, ctx: CallContext, error: BaseException) -> Any:
        v = self.value_or_factory
        return v() if callable(v) else copy.deepcopy(v)

    def __repr__(self) -> str:
        return f"DefaultValue({self.value_or_factory!r})"


class Graceful(Fallback):
    """Return :class:`Unavailable` with a message fit for users that states only what is
    known: ``message`` (e.g. "you have not been charged") only when no attempt reached the
    dependency (circuit open, bulkhead full, rate limited, shed); otherwise
    ``unknown_message`` (default: the outcome is unknown and will be confirmed)."""

    kind = "graceful"

    def __init__(self, message: str | None = None, unknown_message: str | None = None) -> None:
        self.message = message
        self.unknown_message = unknown_message

    def recover(self, ctx: CallContext, error: BaseException) -> Unavailable:
        reason = str(getattr(error, "reason", None) or type(error).__name__)
        outcome, message = self.answer(ctx.dependency, reached=not nothing_reached(error))
        return Unavailable(ctx.dependency, reason, message, outcome)

    def answer(self, dependency: str, *, reached: bool) -> tuple[str, str]:
        """``(outcome, message)`` for what is known: ``"not_attempted"`` and ``message`` only
        when nothing reached the dependency, else ``"unknown"`` and ``unknown_message``. Also
        what a queued job's status says once it failed (workers.resilient)."""
        if not reached:
            return "not_attempted", self.message or f"{dependency} is temporarily unavailable"
        return "unknown", self.unknown_message or (
            f"{dependency} did not answer in time; the outcome is unknown, we will confirm it")

    def __repr__(self) -> str:
        return f"Graceful({self.message!r}, {self.unknown_message!r})"


class QueueForLater(Fallback):
    """Store the request in a :class:`DeferralSink`; return :class:`Deferred`.

    A request already deferred ``max_deferrals`` times (see :func:`replay_lineage`) is not
    deferred again: :class:`NoFallback`, so the error reaches the caller.
    """

    kind = "queue"

    def __init__(self, sink: DeferralSink, max_deferrals: int = 5, *,
                 events: EventBus = EVENTS) -> None:
        if not (isinstance(max_deferrals, int) and max_deferrals >= 1):
            raise ConfigError(f"max_deferrals must be an integer >= 1, got {max_deferrals!r}")
        self.sink = sink
        self.max_deferrals = max_deferrals
        self.events = events

    def recover(self, ctx: CallContext, error: BaseException) -> Deferred:
        lineage = _lineage.get()
        deferrals = (lineage.deferrals if lineage else 0) + 1
        if deferrals > self.max_deferrals:
            self.events.emit(DeferralAttempted(ctx.dependency, "refused"))
            raise NoFallback(
                f"{ctx.dependency}: already deferred {deferrals - 1} times "
                f"(max_deferrals {self.max_deferrals}); not deferred again"
            )
        request = DeferredRequest(
            dependency=ctx.dependency,
            task=ctx.task,
            args=tuple(ctx.args),
            kwargs=dict(ctx.kwargs),
            idempotency_key=ctx.idempotency_key,
            priority=int(ctx.priority),
            reason=f"{type(error).__name__}: {error}",
            first_deferred_at=lineage.first_deferred_at if lineage else time.time(),
            deferrals=deferrals,
        )
        try:
            rid = self.sink.defer(request)
        except DeferralError:
            self.events.emit(DeferralAttempted(ctx.dependency, "failed"))
            raise
        except Exception as exc:
            self.events.emit(DeferralAttempted(ctx.dependency, "failed"))
            raise DeferralError(f"{ctx.dependency}: request not stored: {exc}") from exc
        self.events.emit(DeferralAttempted(ctx.dependency, "stored"))
        return Deferred(rid, ctx.dependency)

    def __repr__(self) -> str:
        return f"QueueForLater({type(self.sink).__name__})"
