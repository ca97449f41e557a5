"""Bulkhead layer: the rest of the chain runs under one of the dependency's slots."""

from __future__ import annotations

import queue
from collections.abc import Awaitable, Callable
from typing import Any

from ..bulkhead import Bulkhead
from ..chain import Compiled

__all__ = ["BulkheadLayer"]


class BulkheadLayer(Compiled):
    def __init__(self, bulkhead: Bulkhead) -> None:
        self.bulkhead = bulkhead

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        take = self.bulkhead.try_take  # raises queue.Empty when full
        put_back = self.bulkhead.put_back
        acquire = self.bulkhead.acquire
        empty = queue.Empty

        def bulkhead(c: tuple) -> Any:
            try:
                take()
            except empty:  # full: wait up to max_wait for a slot, or BulkheadFull
                acquire()
            try:
                return next(c)
            finally:
                put_back(True)

        return bulkhead

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        await self.bulkhead.aacquire()
        try:
            return await next(c)
        finally:
            self.bulkhead.release()
