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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["HedgeConfig"]


@dataclass(frozen=True)
class HedgeConfig:
    """``delay`` seconds before each hedge; at most ``max`` hedges (1..3) per attempt."""

    delay: float
    max: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.delay, bool) or not (
                isinstance(self.delay, int | float) and self.delay > 0
                and math.isfinite(self.delay)):
            raise ConfigError(f"hedge delay must be > 0 and finite, got {self.delay!r}")
        if isinstance(self.max, bool) or not isinstance(self.max, int) or not 1 <= self.max <= 3:
            raise ConfigError(f"hedge max must be an integer from 1 to 3, got {self.max!r}")
