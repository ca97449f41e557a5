"""The API's overload shedder (producers/admission.py LoopLag) refuses LOW, then MEDIUM, then
HIGH as the serving process's CPU share of a core grows, and CRITICAL never."""

from __future__ import annotations

import asyncio
import time

from producers.admission import LoopLag
from resilience.shedding import Priority


def _refused_at(share: float, publishing: float = 1.0) -> set[str]:
    """The classes refused once the watcher has seen the process spend ``share`` of a core
    (a CPU clock running at that fraction of wall time) with the lane full at ``publishing``
    of its ticks."""
    start = time.monotonic()
    ticks = iter(range(10**9))
    lag = LoopLag(cpu_clock=lambda: (time.monotonic() - start) * share,
                  publishing=lambda: next(ticks) % 4 < publishing * 4)

    async def main() -> set[str]:
        lag.refusal(Priority.CRITICAL)  # starts the watcher
        deadline = time.monotonic() + 10
        while ((abs(lag.cpu_share - share) > 0.02 or len_window(lag) < LoopLag.WINDOW)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        lag.lag_s = 0.0  # only the CPU share decides here, however late this loop runs
        return {p.name for p in Priority if lag.refusal(p) is not None}

    return asyncio.run(main())


def len_window(lag: LoopLag) -> int:
    return lag.ticks


def test_cpu_share_sheds_by_priority_and_never_critical():
    assert _refused_at(0.3) == set()
    assert _refused_at(0.6) == {"LOW"}
    assert _refused_at(0.7) == {"LOW", "MEDIUM"}
    assert _refused_at(0.95) == {"LOW", "MEDIUM", "HIGH"}


def test_cpu_spent_on_something_else_than_publishing_sheds_nothing():
    # a process busy elsewhere (an embedding app, a worker beside the API) with an idle lane:
    # shedding jobs would not bring its CPU down
    assert _refused_at(0.95, publishing=0.0) == set()
    assert _refused_at(0.95, publishing=0.25) == {"LOW", "MEDIUM", "HIGH"}


def test_the_refusal_says_why_and_when_to_retry():
    start = time.monotonic()
    lag = LoopLag(cpu_clock=lambda: (time.monotonic() - start) * 0.9)

    async def main():
        lag.refusal(Priority.LOW)
        while lag.cpu_share < 0.85 or lag.ticks < LoopLag.WINDOW:
            await asyncio.sleep(0.01)
        lag.lag_s = 0.0
        return lag.refusal(Priority.LOW)

    shed = asyncio.run(asyncio.wait_for(main(), 10))
    assert "of a core" in str(shed) and shed.retry_after == 1.0


def test_the_watcher_stops_when_no_request_asks(monkeypatch):
    """An idle API does not wake 100 times a second: the watcher ends once nothing asked for
    IDLE_STOP_S, and the next request starts it again."""
    import producers.admission as admission

    monkeypatch.setattr(admission, "IDLE_STOP_S", 0.1)
    lag = LoopLag()

    async def main() -> tuple[bool, bool]:
        lag.refusal(Priority.LOW)
        deadline = time.monotonic() + 10
        while lag._task is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stopped = lag._task is None
        lag.refusal(Priority.LOW)
        return stopped, lag._task is not None

    assert asyncio.run(main()) == (True, True)
