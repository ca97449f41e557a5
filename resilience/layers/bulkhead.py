"""Bulkhead layer: the rest of the chain runs under one of the dependency's slots."""

from __future__ import annotations

import queue
from collections.abc import Awaitable, Callable
from typing import Any

from ..bulkhead import Bulkhead
from ..chain import Call

__all__ = ["BulkheadLayer"]


class BulkheadLayer:
    def __init__(self, bulkhead: Bulkhead) -> None:
        self.bulkhead = bulkhead
        self._take = bulkhead.try_take  # raises queue.Empty when full
        self._put_back = bulkhead.put_back

    def call(self, next: Callable[[Call], Any], c: Call) -> Any:
        try:
            self._take()
        except queue.Empty:  # full: wait up to max_wait for a slot, or BulkheadFull
            self.bulkhead.acquire()
        try:
            return next(c)
        finally:
            self._put_back(True)

    async def acall(self, next: Callable[[Call], Awaitable[Any]], c: Call) -> Any:
        await self.bulkhead.aacquire()
        try:
            return await next(c)
        finally:
            self.bulkhead.release()
