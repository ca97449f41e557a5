"""Retry-budget state: requests and retries over a rolling window of buckets, in process
memory or in Redis (``lua/retry_budget.lua``: spending a retry is one atomic script call)."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from .breaker import BUCKETS_PER_WINDOW

__all__ = ["MemoryBudgetOps", "RedisBudgetOps", "RetryBudgetStore"]


@runtime_checkable
class RetryBudgetStore(Protocol):
    def budget_add(self, name: str, requests: int, window: float) -> None:
        """Deposit requests into the retry budget's window."""

    def budget_spend(
        self, name: str, requests: int, ratio: float, floor: float, window: float
    ) -> bool:
        """Deposit requests, then take one retry if retries + 1 <= ratio*requests + floor."""


class MemoryBudgetOps:
    """Retry budgets in process memory, behind the store's lock."""

    _budgets: dict[str, dict[int, list[int]]]
    _budget_idx: dict[str, int]

    def _budget_window(self, name: str, window: float, now: float) -> tuple[dict, int]:
        buckets = self._budgets.get(name)
        if buckets is None:
            buckets = self._budgets[name] = {}
        idx = math.floor(now / (window / BUCKETS_PER_WINDOW))
        if self._budget_idx.get(name) != idx:  # pruned only when a new bucket starts
            oldest = idx - BUCKETS_PER_WINDOW + 1
            for k in [k for k in buckets if k < oldest]:
                del buckets[k]
            self._budget_idx[name] = idx
        return buckets, idx

    def budget_add(self, name, requests, window):
        with self._lock:
            buckets, idx = self._budget_window(name, window, self.clock.now())
            bucket = buckets.get(idx)
            if bucket is None:
                bucket = buckets[idx] = [0, 0]
            bucket[0] += requests

    def budget_spend(self, name, requests, ratio, floor, window):
        with self._lock:
            buckets, idx = self._budget_window(name, window, self.clock.now())
            bucket = buckets.setdefault(idx, [0, 0])
            bucket[0] += requests
            total_requests = sum(v[0] for v in buckets.values())
            total_retries = sum(v[1] for v in buckets.values())
            if total_retries + 1 <= ratio * total_requests + floor:
                bucket[1] += 1
                return True
            return False


class RedisBudgetOps:
    """Retry budgets in Redis (needs the Redis store's plumbing, as :class:`RedisBreakerOps`)."""

    def _budget_call(self, op, name, requests, ratio, floor, window):
        return self._script("retry_budget")(
            keys=[self.key("budget", name, "window")],
            args=[self._now_arg(), op, requests, ratio, floor, window, BUCKETS_PER_WINDOW],
        )

    def budget_add(self, name, requests, window):
        self._run(
            "budget_add",
            lambda: self._budget_call("add", name, requests, 0, 0, window),
            lambda: self.fallback.budget_add(name, requests, window),
        )

    def budget_spend(self, name, requests, ratio, floor, window):
        return self._run(
            "budget_spend",
            lambda: bool(int(self._budget_call("spend", name, requests, ratio, floor, window))),
            lambda: self.fallback.budget_spend(name, requests, ratio, floor, window),
        )
