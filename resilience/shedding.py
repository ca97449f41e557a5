"""Priority classes and admission under load.

The load signal is a plain callable returning a load fraction (0 idle, 1 at capacity, above 1
overloaded) so producers can feed it queue depth / target depth, and HTTP services CPU or
in-flight requests. Under load LOW goes first, then MEDIUM, then HIGH. CRITICAL is never shed,
whatever the thresholds say.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum

from .errors import ConfigError, Shed
from .events import EVENTS, EventBus, LoadShed

__all__ = ["LoadShedder", "Priority", "SheddingThresholds"]

log = logging.getLogger(__name__)


class Priority(IntEnum):
    """The seed's four classes; a lower value is more important."""

    CRITICAL = 0  # health checks, auth, payment: never shed
    HIGH = 1  # user-facing reads
    MEDIUM = 2  # background sync, notifications
    LOW = 3  # analytics, recommendations, image resizing

    @classmethod
    def parse(cls, value: Priority | str | int) -> Priority:
        """Accept a Priority, its name (any case) or its number; anything else is a ConfigError."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"unknown priority {value!r}")
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise ConfigError(
                    f"unknown priority {value!r} (expected 0-3 or one of "
                    f"{', '.join(p.name.lower() for p in cls)})"
                ) from None
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls.parse(int(text))
            try:
                return cls[text.upper()]
            except KeyError:
                pass
        raise ConfigError(
            f"unknown priority {value!r} (expected one of {', '.join(p.name.lower() for p in cls)})"
        )


@dataclass(frozen=True)
class SheddingThresholds:
    """Load fraction at or above which each class is shed (hard mode).

    Defaults leave headroom: LOW goes at 80% of capacity so higher classes keep the last 20%,
    MEDIUM at 90%, HIGH only once at capacity. ``ramp`` is the width of the smooth mode's
    slope below each threshold (admission falls linearly from 1 to 0 across it).
    """

    low: float = 0.8
    medium: float = 0.9
    high: float = 1.0
    ramp: float = 0.1
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        for name in ("low", "medium", "high"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v <= 0:
                raise ConfigError(f"shedding threshold {name} must be > 0, got {v!r}")
        if not self.low <= self.medium <= self.high:
            raise ConfigError(
                "shedding thresholds must satisfy low <= medium <= high "
                f"(got low={self.low}, medium={self.medium}, high={self.high})"
            )
        if not self.ramp >= 0:
            raise ConfigError(f"shedding ramp must be >= 0, got {self.ramp!r}")
        if not self.retry_after >= 0:
            raise ConfigError(f"shedding retry_after must be >= 0, got {self.retry_after!r}")

    @classmethod
    def from_mapping(cls, table: Mapping[str | Priority, float]) -> SheddingThresholds:
        """Build from ``{"low": 0.7, "medium": 0.85, ...}``; CRITICAL may not be given."""
        kwargs: dict[str, float] = {}
        for key, value in table.items():
            if isinstance(key, str) and key in ("ramp", "retry_after"):
                kwargs[key] = value
                continue
            p = Priority.parse(key)
            if p is Priority.CRITICAL:
                raise ConfigError("CRITICAL is never shed: it takes no threshold")
            kwargs[p.name.lower()] = value
        return cls(**kwargs)

    def threshold(self, priority: Priority) -> float:
        if priority is Priority.CRITICAL:
            return math.inf
        return {Priority.HIGH: self.high, Priority.MEDIUM: self.medium, Priority.LOW: self.low}[
            priority
        ]


class LoadShedder:
    """Admit or shed a request by priority given the current load."""

    def __init__(
        self,
        signal: Callable[[], float],
        thresholds: SheddingThresholds | Mapping[str | Priority, float] | None = None,
        *,
        name: str | None = None,
        error: type[Shed] = Shed,
        events: EventBus = EVENTS,
    ) -> None:
        if thresholds is None:
            thresholds = SheddingThresholds()
        elif not isinstance(thresholds, SheddingThresholds):
            thresholds = SheddingThresholds.from_mapping(thresholds)
        self.signal = signal
        self.thresholds = thresholds
        self.name = name
        self.error = error
        self.events = events

    def load(self) -> float:
        """Read the signal; a broken signal counts as idle (shedding must never cause an outage)."""
        try:
            value = float(self.signal())
        except Exception:
            log.warning(
                "load signal for %s failed; admitting", self.name or "shedder", exc_info=True
            )
            return 0.0
        return 0.0 if math.isnan(value) else value

    def admission_probability(
        self, priority: Priority | str | int, load: float | None = None
    ) -> float:
        """Smooth mode: 1 below ``threshold - ramp``, 0 at the threshold, linear in between."""
        p = Priority.parse(priority)
        if p is Priority.CRITICAL:
            return 1.0
        if load is None:
            load = self.load()
        top = self.thresholds.threshold(p)
        ramp = self.thresholds.ramp
        if load >= top:
            return 0.0
        if ramp <= 0 or load <= top - ramp:
            return 1.0
        return (top - load) / ramp

    def admit(self, priority: Priority | str | int = Priority.HIGH,
              load: float | None = None) -> None:
        """Hard mode: raise Shed when the load is at or above the class's threshold.

        ``load``: the load this one request meets, for callers whose load depends on the
        request (a worker weighs each message's age); else the signal is read."""
        p = Priority.parse(priority)
        if p is Priority.CRITICAL:
            return
        if load is None:
            load = self.load()
        if load >= self.thresholds.threshold(p):
            self._shed(p, load)

    def admit_smooth(
        self,
        priority: Priority | str | int = Priority.HIGH,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """Smooth mode for producer throttles: admit with :meth:`admission_probability`."""
        p = Priority.parse(priority)
        if p is Priority.CRITICAL:
            return
        load = self.load()
        if rng() >= self.admission_probability(p, load):
            self._shed(p, load)

    def _shed(self, p: Priority, load: float) -> None:
        self.events.emit(LoadShed(p.name.lower(), self.name or None, self.error.reason, load))
        raise self.error(
            f"{self.name + ': ' if self.name else ''}{self.error.reason} priority "
            f"{p.name} at load {load:.2f}",
            priority=p,
            retry_after=self.thresholds.retry_after,
            dependency=self.name,
        )
