"""Observed latency per dependency, and the seed's timeout rule: P99 x 2.

The recorder keeps the durations of the last ``size`` calls. A timeout should follow what the
dependency does now, not its average since the process started, and a bounded window keeps
memory constant. Recording is one ``deque.append`` (atomic in CPython, no lock), because the
chain records every call; the sort happens only when somebody asks for a percentile.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from .errors import ConfigError

__all__ = ["LatencyRecorder"]


class LatencyRecorder:
    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ConfigError(f"latency window size must be >= 1, got {size}")
        self.size = size
        self._samples: deque[float] = deque(maxlen=size)
        # the deque's own methods, one C call each: ``record(seconds)``, ``extend(durations)``
        self.record: Callable[[float], None] = self._samples.append
        self.extend: Callable[[Iterable[float]], None] = self._samples.extend

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) of the window, nearest-rank; None before any call."""
        if not 0 < q <= 1:
            raise ConfigError(f"percentile must be in (0, 1], got {q}")
        ordered = sorted(self._samples)  # sorted() copies under the GIL: safe against appends
        if not ordered:
            return None
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def p99(self) -> float | None:
        return self.percentile(0.99)

    def suggested_timeout(self, factor: float = 2.0) -> float | None:
        """The seed's rule: timeout = observed P99 x 2 (None until something was recorded)."""
        p = self.p99()
        return None if p is None else p * factor
