"""Circuit breaker: CLOSED / OPEN / HALF_OPEN over a rolling time window.

The decision logic runs in the state store (:mod:`resilience.stores`) so it is atomic across
processes with Redis. This object adds the local layer that keeps the success path cheap:
outcomes are counted locally and merged into the store every ``sync_interval`` (or at once on
a failure or a slow call), and an OPEN state is cached locally, re-read from the store at
most every ``OPEN_RECHECK_S`` (so an operator's ``tidegate breaker close`` reaches every
process within about a second) and at once when its ``retry_after`` runs out.

The opening decision stays exact: only successes wait, and a failure merges them with it
before the rate is computed. A batch of successes is merged with its age, so the store puts
it in the bucket where it happened (a batch never spans two of the memory store's buckets;
with Redis, whose buckets follow the server's clock, it may land in the bucket next to its
own). This holds for every store, the memory one included; ``sync_interval = 0`` merges
every outcome at once.

:meth:`CircuitBreaker.closed_generation` and :meth:`CircuitBreaker.count_success` are the
success path the breaker layer takes while the breaker is CLOSED and no merge is due: an
attribute read, and one ``next()`` of the generation's tally (an ``itertools.count``, atomic
without a lock; a merge reads it the same way and remembers where it read, a new generation
starts a new tally, so a success that started under an older one lands in a tally nobody
reads - as the lock-guarded generation check dropped it).

Opening rule: with at least ``minimum_calls`` calls in the last ``window`` seconds, the failure
rate (or the slow-call rate) at or above its threshold opens the breaker - the seed's
"exceeds 50%" read the Resilience4j way (at or above). Which exceptions count is set by
``record`` / ``ignore``: ignored errors count neither way; errors in neither tuple count as
success (the dependency answered; the error belongs to the caller).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from .clock import SYSTEM_CLOCK, Clock
from .errors import (
    CircuitOpen,
    ConfigError,
    PermanentError,
    RejectedError,
    TransientError,
    exception_types,
)
from .events import EVENTS, EventBus, Rejected, StateTransition
from .stores import BUCKETS_PER_WINDOW, BreakerSnapshot, MemoryStore, StateStore

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "Permit"]

log = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_RECHECK_S = 1.0  # how long an OPEN state read from the store is trusted locally


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """Value of ``tidegate_breaker_state``: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]

    def __str__(self) -> str:
        return self.value



@dataclass(frozen=True)
class BreakerConfig:
    """Seed defaults: open at 50% failures over 10 s, stay open 30 s, one trial call."""

    failure_rate: float = 0.5
    window: float = 10.0
    minimum_calls: int = 10
    open_duration: float = 30.0
    half_open_calls: int = 1
    slow_call_duration: float | None = None
    slow_call_rate: float = 1.0
    record: tuple[type[BaseException], ...] = (TransientError, OSError, TimeoutError)
    ignore: tuple[type[BaseException], ...] = (PermanentError, RejectedError)
    sync_interval: float = 0.25  # how often local success counts are merged into the store

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"breaker {msg}")

        check(
            0 < self.failure_rate <= 1, f"failure_rate must be in (0, 1], got {self.failure_rate!r}"
        )
        check(
            self.window > 0 and math.isfinite(self.window),
            f"window must be > 0 s, got {self.window!r}",
        )
        check(
            isinstance(self.minimum_calls, int) and self.minimum_calls >= 1,
            f"minimum_calls must be an integer >= 1, got {self.minimum_calls!r}",
        )
        check(
            self.open_duration > 0 and math.isfinite(self.open_duration),
            f"open_duration must be > 0 s, got {self.open_duration!r}",
        )
        check(
            isinstance(self.half_open_calls, int) and self.half_open_calls >= 1,
            f"half_open_calls must be an integer >= 1, got {self.half_open_calls!r}",
        )
        check(
            self.slow_call_duration is None or self.slow_call_duration > 0,
            f"slow_call_duration must be > 0 s or None, got {self.slow_call_duration!r}",
        )
        check(
            0 < self.slow_call_rate <= 1,
            f"slow_call_rate must be in (0, 1], got {self.slow_call_rate!r}",
        )
        check(self.sync_interval >= 0, f"sync_interval must be >= 0 s, got {self.sync_interval!r}")
        object.__setattr__(self, "record", exception_types(self.record, "breaker record"))
        object.__setattr__(self, "ignore", exception_types(self.ignore, "breaker ignore"))

    def classify(self, error: BaseException | None) -> str:
        """'success', 'failure' or 'ignored' for an attempt's outcome."""
        if error is None:
            return "success"
        if isinstance(error, self.ignore) or not isinstance(error, Exception):
            return "ignored"  # includes cancellation (BaseException)
        if isinstance(error, self.record):
            return "failure"
        return "success"


@dataclass(frozen=True)
class Permit:
    """Permission for one attempt; hand it back to :meth:`CircuitBreaker.record`."""

    probe: bool
    generation: int
    started: float = field(default=0.0, compare=False)


StateListener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """One dependency's breaker. Thread-safe; usable from asyncio (store calls are short)."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        store: StateStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        events: EventBus = EVENTS,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self.events = events
        self.store: StateStore = store if store is not None else MemoryStore(clock)
        self.clock = clock
        self.sync_interval = self.config.sync_interval
        self._lock = threading.Lock()
        self._listeners: list[StateListener] = []
        # successes since the last merge (failures merge at once): this generation's tally,
        # read back (and consumed by one) at each merge; ``_fast`` pairs it with its generation
        self._tally = itertools.count()
        self._tally_base = 0
        self._fast: tuple[int, itertools.count] = (-1, self._tally)
        self._batch_until = -math.inf  # successes may wait for the merge until then
        self._last_sync = -math.inf
        self._snap = BreakerSnapshot("closed", -1, 0.0)
        self._local_until = -math.inf  # cached OPEN (or busy HALF_OPEN) holds until then
        self._retry_at = -math.inf  # when the OPEN (or busy HALF_OPEN) state lets calls in
        self._fast_until = -math.inf  # CLOSED and no merge due until then (the success path)
        self._dirty_until = -math.inf  # a failure or slow call seen here is in the window
        events.emit(StateTransition(name, None, "closed"))

    # -- events
    def on_state_change(self, callback: StateListener) -> StateListener:
        """Call ``callback(name, old, new)`` whenever this process sees the state change."""
        self._listeners.append(callback)
        return callback

    def _apply(self, snap: BreakerSnapshot, now: float) -> None:
        with self._lock:
            old = self._snap
            self._snap = snap
            if snap.state == "open" or (snap.state == "half_open" and snap.retry_after > 0):
                # trust it until the store is worth asking again (never past retry_after)
                hold = max(OPEN_RECHECK_S, self.sync_interval) if snap.state == "open" \
                    else self.sync_interval
                self._local_until = now + min(snap.retry_after, hold)
                self._retry_at = now + snap.retry_after
            else:
                self._local_until = self._retry_at = -math.inf
            if snap.generation != old.generation:
                self._tally, self._tally_base = itertools.count(), 0
            self._fast = (snap.generation, self._tally)
            self._fast_until = (
                self._batch_until
                if snap.state == "closed" and snap.generation >= 0 and now >= self._dirty_until
                else -math.inf
            )
        if old.state != snap.state:
            old_s, new_s = BreakerState(old.state), BreakerState(snap.state)
            seen = old.generation >= 0  # else: the first state this process reads
            self.events.emit(StateTransition(self.name, old_s.value if seen else None,
                                             new_s.value))
            if seen:
                for cb in list(self._listeners):
                    try:
                        cb(self.name, old_s, new_s)
                    except Exception:
                        log.exception("breaker %s state listener failed", self.name)

    def _sync(
        self, now: float, calls: int = 0, failures: int = 0, slow: int = 0
    ) -> BreakerSnapshot:
        """Merge the pending successes (with their age) and the given outcome; apply."""
        with self._lock:
            read = next(self._tally)
            earlier = read - self._tally_base
            self._tally_base = read + 1
            age = now - self._last_sync if earlier else 0.0
            self._last_sync = now
            # the next batch ends after sync_interval, or where the window's bucket ends
            width = self.config.window / BUCKETS_PER_WINDOW
            self._batch_until = min(now + self.sync_interval, (now // width + 1) * width)
        snap = self.store.breaker_sync(
            self.name, self.config, calls, failures, slow, earlier, age
        )
        self._apply(snap, now)
        return snap

    # -- state
    @property
    def state(self) -> BreakerState:
        """Current state (merges pending counts first if the sync interval has passed)."""
        now = self.clock.now()
        if self.sync_interval == 0 or now - self._last_sync >= self.sync_interval:
            self._sync(now)
        snap = self._snap
        if snap.state == "open" and now >= self._local_until:
            snap = self.store.breaker_read(self.name, self.config)
            self._apply(snap, now)
        return BreakerState(snap.state)

    @property
    def retry_after(self) -> float:
        """Seconds until an OPEN breaker lets a trial call through (0 when not open)."""
        return (
            max(0.0, self._retry_at - self.clock.now()) if self._snap.state != "closed" else 0.0
        )

    # -- the success path while CLOSED
    def closed_generation(self, now: float) -> int | None:
        """The generation to count a call under while CLOSED with no merge due, else None.

        None means: take the full path (:meth:`acquire`), which merges and re-reads the state.
        """
        return self._snap.generation if now < self._fast_until else None

    def count_success(self, generation: int) -> None:
        """Count one fast (not slow) success started under ``generation``; merged later."""
        gen, tally = self._fast
        if gen == generation:
            next(tally)

    # -- one attempt
    def acquire(self) -> Permit:
        """Permission for one attempt, or :class:`CircuitOpen` (with ``retry_after``)."""
        now = self.clock.now()
        snap = self._snap
        if snap.state == "closed" or snap.generation < 0:
            if snap.generation < 0 or now - self._last_sync >= self.sync_interval:
                snap = self._sync(now)
            if snap.state == "closed":
                return Permit(False, snap.generation, now)
        if now < self._local_until:
            self._reject(self._retry_at - now)
        granted, snap = self.store.breaker_acquire(self.name, self.config)
        self._apply(snap, now)
        if granted:
            return Permit(snap.state == "half_open", snap.generation, now)
        self._reject(snap.retry_after)
        raise AssertionError("unreachable")

    def _reject(self, retry_after: float) -> None:
        retry_after = max(0.0, retry_after)
        self.events.emit(Rejected(self.name, CircuitOpen.reason, retry_after))
        raise CircuitOpen(retry_after=retry_after, dependency=self.name)

    def record(
        self, permit: Permit, error: BaseException | None = None, duration: float | None = None
    ) -> str:
        """Record an attempt's outcome; returns how it was classified."""
        outcome = self.config.classify(error)
        now = self.clock.now()
        if duration is None:
            duration = now - permit.started
        if permit.probe:
            snap = self.store.breaker_result(self.name, self.config, permit.generation, outcome)
            self._apply(snap, now)
            return outcome
        if outcome == "ignored":
            return outcome
        slow_limit = self.config.slow_call_duration
        slow = 1 if slow_limit is not None and duration >= slow_limit else 0
        failed = 1 if outcome == "failure" else 0
        with self._lock:
            if self._snap.generation != permit.generation:
                return outcome  # the state moved on since this attempt started
            if failed or slow:
                self._dirty_until = now + self.config.window
            elif now < self._batch_until and now >= self._dirty_until:
                # a success while the window holds no failure seen here cannot open the
                # breaker: count it now, merge it later
                next(self._tally)
                return outcome
        self._sync(now, 1, failed, slow)
        return outcome

    def record_success(self, permit: Permit, duration: float | None = None) -> None:
        self.record(permit, None, duration)

    def record_failure(
        self, permit: Permit, error: BaseException | None = None, duration: float | None = None
    ) -> None:
        self.record(permit, error if error is not None else TransientError("failure"), duration)

    @contextmanager
    def guard(self) -> Iterator[Permit]:
        """``with breaker.guard(): call()`` - acquire, then record the block's outcome."""
        permit = self.acquire()
        try:
            yield permit
        except BaseException as exc:
            self.record(permit, exc)
            raise
        self.record(permit, None)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.guard():
            return fn(*args, **kwargs)

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.guard():
            return await fn(*args, **kwargs)

    # -- operators and tests
    def force_open(self, duration: float | None = None) -> None:
        """Open now for ``duration`` seconds (default: the configured open duration)."""
        d = self.config.open_duration if duration is None else duration
        if not d > 0:
            raise ConfigError(f"force_open duration must be > 0 s, got {duration!r}")
        self._apply(self.store.breaker_force(self.name, self.config, "open", d), self.clock.now())

    def reset(self) -> None:
        """Close now and forget the window."""
        with self._lock:
            self._tally_base = next(self._tally) + 1
        self._apply(
            self.store.breaker_force(self.name, self.config, "closed", 0.0), self.clock.now()
        )

    def flush(self) -> BreakerState:
        """Merge local counts into the store now (e.g. before a worker shuts down)."""
        return BreakerState(self._sync(self.clock.now()).state)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._snap.state})"
