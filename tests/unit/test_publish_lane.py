"""The API's publish lane runs keyless jobs waiting for a thread as one batch (one broker round
trip for all), each request still getting its own result or its own error."""

from __future__ import annotations

import asyncio
import threading

from producers.admission import PublishLane
from resilience.shedding import Priority


def test_waiting_items_run_as_one_batch_each_with_its_own_outcome():
    batches: list[list[str]] = []
    release = threading.Event()

    def batch(items: list[str]) -> list[object]:
        batches.append(list(items))
        return [ValueError(i) if i == "bad" else f"done {i}" for i in items]

    lane = PublishLane(threads=1, batch=batch, max_batch=3)

    async def main() -> list[object]:
        # the only thread is busy: what arrives meanwhile waits, then goes in batches of 3
        blocker = asyncio.ensure_future(lane.run(Priority.CRITICAL, 1.0, release.wait))
        while not lane.busy():
            await asyncio.sleep(0.001)
        items = ["a", "bad", "c", "d"]
        calls = [asyncio.ensure_future(lane.run(Priority.CRITICAL, 1.0, lambda: "alone", i))
                 for i in items]
        alone = asyncio.ensure_future(lane.run(Priority.CRITICAL, 1.0, lambda: "no item"))
        await asyncio.sleep(0.01)
        release.set()
        await blocker
        return await asyncio.gather(*calls, alone, return_exceptions=True)

    a, bad, c, d, alone = asyncio.run(main())
    # the fourth is left alone in the queue: a job on its own runs its own function
    assert (a, c, d, alone) == ("done a", "done c", "alone", "no item")
    assert isinstance(bad, ValueError)
    assert batches == [["a", "bad", "c"]]


def test_a_batch_that_raises_fails_each_of_its_jobs():
    def batch(items: list[str]) -> list[object]:
        raise ConnectionError("broker gone")

    lane = PublishLane(threads=1, batch=batch)

    async def main() -> object:
        return await lane.run(Priority.HIGH, 1.0, lambda: "unused", "x")

    # a batch of one runs its own fn; the batch function only sees two or more
    assert asyncio.run(main()) == "unused"

    release = threading.Event()

    async def two() -> list[object]:
        blocker = asyncio.ensure_future(lane.run(Priority.CRITICAL, 1.0, release.wait))
        while not lane.busy():
            await asyncio.sleep(0.001)
        calls = [asyncio.ensure_future(lane.run(Priority.HIGH, 1.0, lambda: "unused", i))
                 for i in ("x", "y")]
        await asyncio.sleep(0.01)
        release.set()
        await blocker
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(two())
    assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes
