"""The process-local state store: every pattern's memory operations behind one lock."""

from __future__ import annotations

import threading

from ..clock import SYSTEM_CLOCK, Clock
from .breaker import MemoryBreakerOps, _Breaker
from .ratelimit import MemoryGcraOps
from .retry_budget import MemoryBudgetOps

__all__ = ["MemoryStore"]


class MemoryStore(MemoryBreakerOps, MemoryGcraOps, MemoryBudgetOps):
    """Process-local state behind one lock; the reference semantics of every operation."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, name: str = "memory") -> None:
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self._breakers: dict[str, _Breaker] = {}
        self._tat: dict[str, float] = {}
        self._budgets: dict[str, dict[int, list[int]]] = {}
        self._budget_idx: dict[str, int] = {}
