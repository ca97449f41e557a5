"""Bulkhead: a concurrency limit per dependency, with a bounded wait and a clear rejection.

A slot is a token in a ``queue.SimpleQueue`` (C code: taking one is a single call, and a
bounded wait is the queue's own blocking ``get``; a lock plus a counter cost twice as much). Sync
work either runs inline under a slot (:meth:`Bulkhead.call`, the cooperative timeout mode)
or in the bulkhead's own thread pool (:meth:`Bulkhead.submit`, size = ``max_concurrent``) so
an attempt can be abandoned on timeout; the slot is released only when the work really
finishes, so abandoned work stays bounded by the limit and the pool's queue never grows.
Async callers take the same slots (one limit per dependency, whichever style calls it).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import BulkheadFull, ConfigError
from .events import EVENTS, EventBus, Rejected

__all__ = ["Bulkhead", "BulkheadConfig"]

T = TypeVar("T")


@dataclass(frozen=True)
class BulkheadConfig:
    """Seed: payments 20, search 50. ``max_wait`` 0 rejects at once when full."""

    max_concurrent: int = 20
    max_wait: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_concurrent, int) and self.max_concurrent >= 1):
            raise ConfigError(
                f"bulkhead max_concurrent must be an integer >= 1, got {self.max_concurrent!r}"
            )
        if not (self.max_wait >= 0 and math.isfinite(self.max_wait)):
            raise ConfigError(f"bulkhead max_wait must be >= 0 s and finite, got {self.max_wait!r}")


class Bulkhead:
    def __init__(self, name: str, config: BulkheadConfig | None = None, *,
                 events: EventBus = EVENTS) -> None:
        self.name = name
        self.events = events
        self.config = config or BulkheadConfig()
        self._max = self.config.max_concurrent
        self._slots: queue.SimpleQueue[bool] = queue.SimpleQueue()
        for _ in range(self._max):
            self._slots.put(True)
        # the chain's bulkhead layer: a token taken (raises queue.Empty when full) and given
        # back (``put_back(True)``) in one C call each, without release()'s over-release
        # check (the layer pairs them)
        self.try_take = self._slots.get_nowait
        self.put_back = self._slots.put
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Slots taken, including abandoned work still running."""
        return self._max - self._slots.qsize()

    def _try_take(self) -> bool:
        try:
            self._slots.get_nowait()
        except queue.Empty:
            return False
        return True

    def _reject(self) -> None:
        self.events.emit(Rejected(self.name, BulkheadFull.reason))
        raise BulkheadFull(
            f"{self.name}: bulkhead full ({self.config.max_concurrent} concurrent calls)",
            dependency=self.name,
        )

    def acquire(self, max_wait: float | None = None) -> None:
        """Take a slot, waiting at most ``max_wait`` (default: the config's), or BulkheadFull."""
        try:
            self._slots.get_nowait()
            return
        except queue.Empty:
            pass
        wait = self.config.max_wait if max_wait is None else max_wait
        if wait > 0:
            try:
                self._slots.get(timeout=wait)
                return
            except queue.Empty:
                pass
        self._reject()

    async def aacquire(self, max_wait: float | None = None) -> None:
        """Async :meth:`acquire`: polls briefly under contention instead of blocking the loop."""
        if self._try_take():
            return
        wait = self.config.max_wait if max_wait is None else max_wait
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        pause = 0.0005
        while True:
            left = end - loop.time()
            if left <= 0:
                self._reject()
            await asyncio.sleep(min(pause, left))
            if self._try_take():
                return
            pause = min(pause * 2, 0.01)

    def release(self) -> None:
        """Give a slot back (a waiter in :meth:`acquire` wakes up)."""
        if self._slots.qsize() >= self._max:
            raise ValueError(f"{self.name}: bulkhead released more often than acquired")
        self._slots.put(True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self.config.max_concurrent,
                        thread_name_prefix=f"bulkhead-{self.name}",
                    )
        return self._pool

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Take a slot and run ``fn`` in the pool (context variables follow it).

        The slot is released when ``fn`` returns, even if the caller stopped waiting.
        """
        self.acquire()
        ctx = contextvars.copy_context()
        try:
            future = self._executor().submit(ctx.run, fn, *args, **kwargs)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _f: self.release())
        return future

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` inline under a slot (no timeout, no thread hop)."""
        self.acquire()
        try:
            return fn(*args, **kwargs)
        finally:
            self.release()

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        await self.aacquire()
        try:
            return await fn(*args, **kwargs)
        finally:
            self.release()

    def shutdown(self, wait: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
