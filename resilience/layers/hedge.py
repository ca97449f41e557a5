"""Hedge layer: the rest of the chain (one attempt) runs in a pool; if it has not answered
after ``delay``, up to ``max`` more start in parallel, each paid for from the retry budget.
The first success wins; failures are waited out while another attempt still runs; the last
failure is raised (to the retry layer above). See :mod:`resilience.hedge`."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ..chain import Compiled
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import DeadlineExceeded
from ..events import EVENTS, EventBus, Hedged
from ..hedge import HedgeConfig, HedgeDelay
from ..retry import RetryBudget

__all__ = ["HedgeLayer"]


class HedgeLayer(Compiled):
    def __init__(self, name: str, config: HedgeConfig, budget: RetryBudget, *,
                 pool_size: int = 64, clock: Clock = SYSTEM_CLOCK,
                 events: EventBus = EVENTS, delay: HedgeDelay | None = None) -> None:
        self.name = name
        self.config = config
        # the delay, read per call: fixed, or moved by the policy with the observed latency
        self.delay = delay if delay is not None else HedgeDelay(config)
        self.budget = budget
        self.clock = clock
        self.events = events
        self.pool = ThreadPoolExecutor(max_workers=pool_size,
                                       thread_name_prefix=f"hedge-{name}")

    def _may_hedge(self, c: tuple) -> bool:
        """A hedge may start: the deadline is not past, and the retry budget pays for it."""
        d = c[7]  # c.deadline: an (expires_at, clock) pair
        if d is not None and d[0] <= self.clock.now():
            return False
        if not self.budget.try_spend():
            self.events.emit(Hedged(self.name, "refused"))
            return False
        self.events.emit(Hedged(self.name, "started"))
        return True

    def _submit(self, next: Callable[[tuple], Any], c: tuple) -> Future:
        return self.pool.submit(contextvars.copy_context().run, next, c)

    def wrap(self, next: Callable[[tuple], Any]) -> Callable[[tuple], Any]:
        return functools.partial(self._hedged, next)

    def _hedged(self, next: Callable[[tuple], Any], c: tuple) -> Any:
        now = self.clock.now
        d = c[7]
        first = self._submit(next, c)
        pending = {first}
        hedges = self.config.max
        hedge_at = now() + self.delay.seconds
        error: BaseException | None = None
        while pending:
            if hedges:
                timeout = max(0.0, hedge_at - now())
            elif d is not None:
                timeout = max(0.0, d[0] - now())
            else:
                timeout = None
            done, pending = wait(pending, timeout, FIRST_COMPLETED)
            for f in done:
                if f.exception() is None:
                    if f is not first:
                        self.events.emit(Hedged(self.name, "won"))
                    return f.result()
                error = f.exception()
            if not pending:
                break
            if hedges and now() >= hedge_at:
                if self._may_hedge(c):
                    hedges -= 1
                    pending.add(self._submit(next, (*c[:6], c[6] + 1, c[7])))
                    hedge_at = now() + self.delay.seconds
                else:
                    hedges = 0
            elif not hedges and not done and timeout is not None:
                # the deadline passed with every attempt still out: abandon them
                raise DeadlineExceeded(f"{self.name}: deadline passed with "
                                       f"{len(pending)} hedged attempts out")
        assert error is not None
        raise error

    async def acall(self, next: Callable[[tuple], Awaitable[Any]], c: tuple) -> Any:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(next(c))
        pending = {first}
        hedges = self.config.max
        hedge_at = loop.time() + self.delay.seconds
        error: BaseException | None = None
        try:
            while pending:
                timeout = max(0.0, hedge_at - loop.time()) if hedges else None
                done, pending = await asyncio.wait(pending, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    if f.exception() is None:
                        if f is not first:
                            self.events.emit(Hedged(self.name, "won"))
                        return f.result()
                    error = f.exception()
                if not pending:
                    break
                if hedges and loop.time() >= hedge_at:
                    if self._may_hedge(c):
                        hedges -= 1
                        pending.add(asyncio.ensure_future(
                            next((*c[:6], c[6] + 1, c[7]))))
                        hedge_at = loop.time() + self.delay.seconds
                    else:
                        hedges = 0
        finally:
            for f in pending:  # the losers are cancelled
                f.cancel()
        assert error is not None
        raise error

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
