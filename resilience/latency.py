"""Observed latency per dependency, and the seed's timeout rule: P99 x 2.

A bounded reservoir (Vitter's algorithm R) keeps memory constant however many calls are
recorded; the P99 it gives is an estimate, good enough to *suggest* a timeout to an operator.
"""

from __future__ import annotations

import math
import random
import threading

from .errors import ConfigError

__all__ = ["LatencyRecorder"]


class LatencyRecorder:
    def __init__(self, size: int = 2048, rng: random.Random | None = None) -> None:
        if size < 1:
            raise ConfigError(f"latency reservoir size must be >= 1, got {size}")
        self.size = size
        self.count = 0
        self._samples: list[float] = []
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
            if len(self._samples) < self.size:
                self._samples.append(seconds)
            else:
                j = self._rng.randrange(self.count)
                if j < self.size:
                    self._samples[j] = seconds

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) of what was seen, nearest-rank; None before any call."""
        if not 0 < q <= 1:
            raise ConfigError(f"percentile must be in (0, 1], got {q}")
        with self._lock:
            if not self._samples:
                return None
            ordered = sorted(self._samples)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def p99(self) -> float | None:
        return self.percentile(0.99)

    def suggested_timeout(self, factor: float = 2.0) -> float | None:
        """The seed's rule: timeout = observed P99 x 2 (None until something was recorded)."""
        p = self.p99()
        return None if p is None else p * factor
