"""Hedged attempts: after ``delay`` with no answer, start another attempt in parallel; the
first success wins and the others are abandoned (left to end within their own attempt
budget, or cancelled in asyncio).

Hedging cuts tail latency when the slowness is in the request, not in the dependency (one
slow replica, a GC pause, a lost packet): a second try usually lands on a fast path. It
doubles the work it is used on, so it is bounded three ways: only idempotent dependencies
may hedge (a PolicyConfig with a hedge and ``idempotent = false`` is refused at load), each
hedge spends one retry from the dependency's retry budget (no budget, no hedge: a
dependency that is slow for everyone is not hammered twice), and no hedge starts once the
call's deadline has passed. Each attempt runs the rest of the chain (breaker, bulkhead or
adaptive limit, timeout), so hedges take slots and are counted like any attempt.

The delay is fixed (``hedge.delay_ms``) or follows the dependency's observed latency
(``hedge.delay = "p95"``): :class:`HedgeDelay` sets it to that percentile of this process's
latency window (the policy's last 2048 attempts, :mod:`resilience.latency`) at most once a
second, once ``MIN_SAMPLES`` attempts are in, never below ``floor``; before that it is
``initial`` (default: half the attempt timeout, which under the seed's rule - timeout = P99 x
2 - is about the P99, so an unknown dependency is hedged rarely rather than often). A p95
delay hedges about one call in twenty by construction, whatever the dependency's speed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError
from .events import EVENTS, EventBus, HedgeDelaySet
from .latency import LatencyRecorder

__all__ = ["MIN_SAMPLES", "HedgeConfig", "HedgeDelay", "parse_percentile"]

MIN_SAMPLES = 20  # a percentile from fewer attempts is noise (as timeout_ms = "p99x2")
DEFAULT_FLOOR = 0.005
_PERCENTILE = re.compile(r"^p([5-9][0-9])$")


def parse_percentile(spec: str) -> float:
    """``"p95"`` -> 0.95 (p50..p99)."""
    m = _PERCENTILE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(f'hedge delay must be a percentile from "p50" to "p99", got {spec!r}')
    return int(m.group(1)) / 100


def _positive(value: float | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not (
            isinstance(value, int | float) and value > 0 and math.isfinite(value))):
        raise ConfigError(f"hedge {what} must be > 0 and finite, got {value!r}")


@dataclass(frozen=True)
class HedgeConfig:
    """``delay`` seconds before each hedge, or ``percentile = "p95"``: the delay follows the
    observed latency (from ``initial``, never below ``floor``); at most ``max`` hedges (1..3)
    per attempt. :class:`~resilience.policy_config.PolicyConfig` sets a missing ``initial``
    to half the attempt timeout."""

    delay: float | None = None
    max: int = 1
    percentile: str | None = None
    floor: float | None = None
    initial: float | None = None

    def __post_init__(self) -> None:
        if self.percentile is None:
            if self.delay is None:
                raise ConfigError('hedge needs delay_ms or delay = "p95"')
            _positive(self.delay, "delay")
            if self.floor is not None or self.initial is not None:
                raise ConfigError('hedge floor_ms and initial_ms go with delay = "p95" '
                                  "(a fixed delay_ms has nothing to bound)")
        else:
            parse_percentile(self.percentile)
            if self.delay is not None:
                raise ConfigError('hedge takes delay_ms or delay = "p95", not both '
                                  "(initial_ms is the delay before enough samples)")
            _positive(self.floor, "floor_ms")
            _positive(self.initial, "initial_ms")
        if isinstance(self.max, bool) or not isinstance(self.max, int) or not 1 <= self.max <= 3:
            raise ConfigError(f"hedge max must be an integer from 1 to 3, got {self.max!r}")

    @property
    def q(self) -> float | None:
        """The followed quantile (0.95 for "p95"), None for a fixed delay."""
        return None if self.percentile is None else parse_percentile(self.percentile)

    @property
    def min_delay(self) -> float:
        return DEFAULT_FLOOR if self.floor is None else self.floor


class HedgeDelay:
    """The delay before each hedge, read by the hedge layer per call: the fixed one, or the
    one :meth:`follow` moves with the observed latency (a float swap, no lock; each move is a
    :class:`~resilience.events.HedgeDelaySet` event, ``tidegate_hedge_delay_seconds``)."""

    def __init__(self, config: HedgeConfig, *, dependency: str = "-",
                 refresh_every: float = 1.0, events: EventBus = EVENTS) -> None:
        self.config = config
        self.dependency = dependency
        self.events = events
        self.q = config.q
        start = config.delay if config.delay is not None else config.initial
        # a percentile delay with no initial (a HedgeConfig built in code): start at the floor
        self.seconds: float = start if start is not None else config.min_delay
        self.refresh_every = refresh_every
        self._due = -math.inf

    def follow(self, latency: LatencyRecorder, now: float) -> float | None:
        """Set the delay to the window's percentile (at most every ``refresh_every`` s, once
        ``MIN_SAMPLES`` are in, never below the floor); returns it, None when unchanged."""
        if self.q is None or now < self._due:
            return None
        self._due = now + self.refresh_every
        if len(latency) < MIN_SAMPLES:
            return None
        p = latency.percentile(self.q)
        if p is None:
            return None
        seconds = max(self.config.min_delay, p)
        if seconds != self.seconds:
            self.seconds = seconds
            self.events.emit(HedgeDelaySet(self.dependency, seconds))
        return seconds

    def follower(self, latency: LatencyRecorder, now: Callable[[], float]
                 ) -> Callable[[int], None]:
        """A consumer for :class:`~resilience.callstats.CallStats` (called as successes are
        folded in): follows ``latency`` on the policy's clock."""
        def consume(_successes: int) -> None:
            self.follow(latency, now())
        return consume
