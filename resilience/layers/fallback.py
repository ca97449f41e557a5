"""Fallback layer: a transient failure below it becomes a stand-in answer (cached, default,
graceful or queued for later); every success is shown to the fallback (a cache keeps it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..chain import Compiled
from ..errors import PermanentError, TransientError
from ..events import EVENTS, CallFinished, EventBus, FallbackServed
from ..fallback import CallContext, Fallback, NoFallback

__all__ = ["FallbackLayer", "task_name"]


def task_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "name", None)  # Celery tasks carry their registered name
    if isinstance(name, str):
        return name
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class FallbackLayer(Compiled):
    """Serve ``fallback`` for errors of ``on`` types (never for a ``PermanentError``)."""

    def __init__(
        self,
        fallback: Fallback,
        *,
        dependency: str,
        on: tuple[type[BaseException], ...] = (TransientError, OSError, TimeoutError),
        events: EventBus = EVENTS,
    ) -> None:
        self.fallback = fallback
        self.dependency = dependency
        self.on = on
        self.events = events

    def _context(self, c: tuple) -> CallContext:
        return CallContext(self.dependency, task_name(c[0]), c[1], c[2], c[3], int(c[4]))

    def _recover(self, c: tuple, error: Exception) -> Any:
        if isinstance(error, PermanentError) or not isinstance(error, self.on):
            raise error
        try:
            result = self.fallback.recover(self._context(c), error)
        except NoFallback:
            raise error from None
        self.events.emit(FallbackServed(self.dependency, self.fallback.kind))
        self.events.emit(CallFinished(self.dependency, "fallback"))
        return result

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        layer = self
        keeps = self.fallback.sees_successes  # else a success has nothing to show it

        def fallback(c: tuple) -> Any:
            try:
                result = next(c)
            except Exception as error:
                return layer._recover(c, error)
            if keeps:
                layer.fallback.on_success(layer._context(c), result)
            return result

        return fallback

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        try:
            result = await next(c)
        except Exception as error:
            return self._recover(c, error)
        self.fallback.on_success(self._context(c), result)
        return result
