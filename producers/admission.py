"""Fast admission for the HTTP API: refusals are decided on the event loop, in microseconds.

An overloaded service must answer "no" at once, or its clients time out and retry. So the API
never makes a refusal wait for a thread or the broker:

- :class:`CachedState` keeps what admission needs fresh in one background thread (each queue's
  depth estimate, each deferring dependency's breaker state) and hands it to the event loop
  without I/O. The per-client rate limit is mirrored in a process-local GCRA, so a client over
  its rate gets its 429 on the loop; the cluster-wide Redis limiter still has the last word
  when the job is published (with several API processes, each sees only its share).
- :class:`PublishLane` runs the blocking work (idempotency records, deferral, publish) on
  threads of its own, CRITICAL first, and admits a job only if its *expected* wait for a
  thread fits its class's share of ``max_wait``: HIGH a fifth, MEDIUM a tenth, LOW a
  twentieth, CRITICAL up to the lane's hard cap. A slow or hung broker lengthens the expected
  wait, so new requests are refused at once instead of queueing behind it. Jobs that may share
  a round trip (keyless POSTs) and find others waiting are published as one batch.
- :class:`LoopLag` refuses LOW, then MEDIUM, then HIGH outright while every publish thread is
  busy and the event loop runs late or the process nears a core's worth of CPU: the threads
  hold the GIL the loop needs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from resilience.breaker import BreakerState
from resilience.errors import RateLimited, Shed
from resilience.ratelimit import RateLimitConfig, RateLimiter
from resilience.shedding import Priority
from resilience.stores import MemoryStore
from workers.depth import DepthUnavailable

from . import metrics
from .backpressure import Decision

__all__ = ["CLASS_WAIT_SHARE", "CachedState", "LoopLag", "PublishLane"]

log = logging.getLogger(__name__)

# The share of max_wait a class may *expect* to queue for a publish thread to be admitted
# (CRITICAL: no limit but the lane's hard cap). Far below 1 on purpose: a queue allowed to
# stand at max_wait makes every accepted job wait that long, and a misjudged one is refused
# late; admitted at a fifth of it, a job still waiting at max_wait is a rare exception.
CLASS_WAIT_SHARE = {Priority.CRITICAL: math.inf, Priority.HIGH: 0.2, Priority.MEDIUM: 0.1,
                    Priority.LOW: 0.05}
STALE_S = 5.0  # a cached depth older than this is not trusted (the job decides in the lane)
IDLE_STOP_S = 30.0  # the refresher stops after this long without a request


class PublishLane:
    """A bounded pool of threads for the API's blocking calls, ordered by priority.

    ``threads`` is the publish concurrency; ``max_queued`` caps jobs waiting for a thread
    (CRITICAL included). A job's expected wait is the jobs ahead of it (waiting jobs of its
    class or a more important one) plus one, over ``threads``, times the service time: a moving
    average of job durations, or the age of the youngest running job when every thread has been
    busy longer than that (a hung broker shows there before any job finishes). A job is admitted
    if that fits its class's share of the budget (:data:`CLASS_WAIT_SHARE`); one still waiting
    when the whole budget has run out is refused then, on the event loop.

    Few threads on purpose: the publish is mostly Python (kombu) holding the GIL, and every busy
    thread takes a share of it from the event loop that answers the refusals.
    """

    def __init__(self, threads: int = 4, max_queued: int = 512, name: str = "tidegate-publish",
                 *, batch: Callable[[list[Any]], list[Any]] | None = None,
                 max_batch: int = 32) -> None:
        self.threads, self.max_queued, self.name = threads, max_queued, name
        # Jobs submitted with an ``item`` may run together: a thread that finds several waiting
        # hands their items to ``batch`` at once (one broker round trip for all, so the GIL
        # changes hands a few times per batch instead of a few times per job).
        self.batch, self.max_batch = batch, max_batch
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Any]] = []
        self._waiting = [0] * len(Priority)  # waiting jobs per class
        self._seq = itertools.count()
        self._running: dict[int, float] = {}  # job seq -> start (monotonic)
        self._service_s = 0.002
        self._started = False
        self._gauge_running = metrics.API_LANE.labels(state="running")
        self._gauge_waiting = metrics.API_LANE.labels(state="waiting")

    # -- the event loop's view (no blocking: a lock held for microseconds)
    def expected_wait(self, priority: Priority = Priority.LOW) -> float:
        with self._cond:
            ahead = sum(self._waiting[: int(priority) + 1])
            running = len(self._running)
            if running < self.threads and not ahead:
                return 0.0
            service = self._service_s
            if running >= self.threads:
                service = max(service, time.monotonic() - max(self._running.values()))
        return (ahead + 1) * service / self.threads

    def busy(self) -> bool:
        """Every thread is publishing (so publishing competes with the event loop)."""
        return len(self._running) >= self.threads

    def refusal(self, priority: Priority, budget_s: float) -> Shed | None:
        """Why a job of ``priority`` allowed to queue ``budget_s`` may not enter, or None."""
        full = len(self._heap) >= self.max_queued
        wait = math.inf if full else self.expected_wait(priority)
        if not full and wait <= budget_s * CLASS_WAIT_SHARE[priority]:
            return None
        why = "full" if full else f"expected wait {wait * 1000:.0f} ms"
        return Shed(f"api overloaded ({why}): priority {priority.name} shed",
                    priority=priority, retry_after=max(1.0, min(wait, 30.0)))

    async def run(self, priority: Priority, budget_s: float, fn: Callable[[], Any],
                  item: Any = None) -> Any:
        """Run ``fn`` on a lane thread; :class:`Shed` if it is still waiting for a thread after
        ``budget_s`` (CRITICAL waits as long as it takes). With ``item`` (and a lane built with
        ``batch``) the job may instead run as part of ``batch([..., item, ...])``, whose entry
        for it is its result, or the exception it raises."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        state = ["queued"]  # -> "running" (lane thread) or "expired" (event loop), under _cond
        rank = int(priority)

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                (future.set_result if ok else future.set_exception)(value)

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting request, never lost here
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        def hand(outcome: Any) -> None:  # this job's entry of a batch
            loop.call_soon_threadsafe(settle, not isinstance(outcome, BaseException), outcome)

        job.item, job.hand = item, hand  # type: ignore[attr-defined]

        def expire() -> None:
            with self._cond:
                if state[0] != "queued":
                    return
                state[0] = "expired"
                self._waiting[rank] -= 1
                self._gauges()
            settle(False, Shed(f"api overloaded (no publish thread within "
                               f"{limit * 1000:.0f} ms): priority {priority.name} shed",
                               priority=priority, retry_after=1.0))

        self._submit(rank, job, state)
        limit = math.inf if priority is Priority.CRITICAL else budget_s
        timer = loop.call_later(limit, expire) if math.isfinite(limit) else None
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            with self._cond:  # the request went away while queued: its job never runs
                if state[0] == "queued":
                    state[0] = "expired"
                    self._waiting[rank] -= 1
                    self._gauges()

    # -- threads
    def _submit(self, rank: int, job: Callable[[], None], state: list[str]) -> None:
        with self._cond:
            if not self._started:
                self._started = True
                for i in range(self.threads):
                    threading.Thread(target=self._work, daemon=True,
                                     name=f"{self.name}-{i}").start()
            heapq.heappush(self._heap, (rank, next(self._seq), (job, state)))
            self._waiting[rank] += 1
            self._gauges()
            self._cond.notify()

    def _take(self) -> tuple[int, list[Any]]:
        """Under _cond: the next job, and the batchable ones waiting behind it (in order)."""
        jobs: list[Any] = []
        seq = -1
        while self._heap and len(jobs) < self.max_batch:
            rank, s, (job, state) = self._heap[0]
            if jobs and (self.batch is None or job.item is None or jobs[0].item is None):
                break
            heapq.heappop(self._heap)
            if state[0] != "queued":
                continue
            state[0] = "running"
            self._waiting[rank] -= 1
            seq = s if seq < 0 else seq
            jobs.append(job)
            if self.batch is None or job.item is None:
                break
        return seq, jobs

    def _work(self) -> None:
        while True:
            with self._cond:
                jobs: list[Any] = []
                while not jobs:
                    while not self._heap:
                        self._cond.wait()
                    seq, jobs = self._take()
                started = time.monotonic()
                self._running[seq] = started
                self._gauges()
            try:
                if len(jobs) == 1:
                    jobs[0]()
                else:
                    self._run_batch(jobs)
            except BaseException:  # job() hands its errors over; this is a bug in the lane
                log.exception("publish lane job failed")
            finally:
                took = time.monotonic() - started
                with self._cond:
                    del self._running[seq]
                    # the service time per job: what a waiting job's expected wait is made of
                    self._service_s += 0.1 * (took / len(jobs) - self._service_s)
                    self._gauges()

    def _run_batch(self, jobs: list[Any]) -> None:
        assert self.batch is not None
        try:
            outcomes = self.batch([job.item for job in jobs])
        except BaseException as exc:  # the batch as a whole failed: each job gets the error
            outcomes = [exc] * len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.hand(outcome)

    def _gauges(self) -> None:  # under _cond
        self._gauge_running.set(len(self._running))
        self._gauge_waiting.set(sum(self._waiting))


class LoopLag:
    """How loaded the serving process is, from two readings taken by a 10 ms timer on its
    event loop: how late the timer runs (the queueing time every request pays before the app
    sees it) and the process's CPU time per second of wall time over the last ~200 ms (all
    its threads: the event loop and the publish lane share one GIL, so past ~0.8 of a core
    requests start to wait in the socket backlog). Refusing the least important work as
    either grows keeps the answers fast; only what is admitted costs the publish work, so
    shedding it is what brings the CPU share back down."""

    # lag (s) from which each class is refused outright; CRITICAL never
    SHED_FROM = {Priority.LOW: 0.010, Priority.MEDIUM: 0.020, Priority.HIGH: 0.040,
                 Priority.CRITICAL: math.inf}
    # CPU share of one core from which each class is refused outright; CRITICAL never
    CPU_FROM = {Priority.LOW: 0.55, Priority.MEDIUM: 0.65, Priority.HIGH: 0.75,
                Priority.CRITICAL: math.inf}
    WINDOW = 20  # ticks the CPU share is measured over

    def __init__(self, tick_s: float = 0.01,
                 cpu_clock: Callable[[], float] = time.process_time,
                 publishing: Callable[[], bool] = lambda: True) -> None:
        self.tick_s, self.cpu_clock, self.publishing = tick_s, cpu_clock, publishing
        self.lag_s = 0.0
        self.cpu_share = 0.0
        self.publishing_share = 0.0  # share of ticks at which ``publishing()`` (lane full)
        self.ticks = 0
        self._asked = 0.0
        self._task: asyncio.Task | None = None

    def refusal(self, priority: Priority, lane_busy: bool = True) -> Shed | None:
        """Why a job of ``priority`` is refused now, or None. Lag counts while every publish
        thread is busy (``lane_busy``: a late loop is then the threads' doing); the CPU share
        once measured over a whole window in which every lane thread was busy at a quarter of
        the ticks or more (the CPU is then spent on publishing, which shedding reduces, not on
        something else in the process; clients one at a time never fill a lane of two)."""
        self._asked = time.monotonic()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        if lane_busy and self.lag_s >= self.SHED_FROM[priority]:
            why = f"event loop {self.lag_s * 1000:.0f} ms behind"
        elif self.publishing_share >= 0.25 and self.cpu_share >= self.CPU_FROM[priority]:
            why = f"process at {self.cpu_share:.0%} of a core"
        else:
            return None
        return Shed(f"api overloaded ({why}): priority {priority.name} shed",
                    priority=priority, retry_after=1.0)

    async def _watch(self) -> None:
        readings: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=self.WINDOW + 1)
        busy: collections.deque[bool] = collections.deque(maxlen=self.WINDOW)
        lag_gauge = metrics.API_LOAD.labels(measure="loop_lag_seconds")
        cpu_gauge = metrics.API_LOAD.labels(measure="cpu_share")
        try:
            # a 100 Hz timer only while requests come (an idle API wakes for nothing)
            while time.monotonic() - self._asked < IDLE_STOP_S:
                before = time.monotonic()
                await asyncio.sleep(self.tick_s)
                now = time.monotonic()
                lag = max(0.0, now - before - self.tick_s)
                # rise at once, fall over a few ticks: hysteresis against flapping
                self.lag_s = lag if lag > self.lag_s else self.lag_s + 0.3 * (lag - self.lag_s)
                readings.append((now, self.cpu_clock()))
                busy.append(self.publishing())
                self.ticks += 1
                # a share over less than a whole window is not one (a process starting up)
                self.publishing_share = (sum(busy) / len(busy)
                                         if len(busy) == self.WINDOW else 0.0)
                (t0, cpu0), (t1, cpu1) = readings[0], readings[-1]
                if t1 > t0:
                    self.cpu_share = (cpu1 - cpu0) / (t1 - t0)
                lag_gauge.set(self.lag_s)
                cpu_gauge.set(self.cpu_share)
        finally:
            self._task = None
            self.lag_s = self.cpu_share = self.publishing_share = 0.0  # a restart measures anew
            lag_gauge.set(0.0)
            cpu_gauge.set(0.0)


class _PublishGate:
    """Publishes share it, a depth reading takes it alone (writer first).

    A message that is on the queue before the reading but counted after it would be counted
    twice until the next reading (see :class:`workers.depth.SharedDepthCache`); with the
    refresher reading while lane threads publish that is the common case, not the rare one.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._publishing = 0
        self._reading = False
        self._waiting_readers = 0

    @contextlib.contextmanager
    def publish(self) -> Iterator[None]:
        with self._cond:
            while self._reading or self._waiting_readers:
                self._cond.wait()
            self._publishing += 1
        try:
            yield
        finally:
            with self._cond:
                self._publishing -= 1
                if not self._publishing:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._waiting_readers += 1
            while self._publishing or self._reading:
                self._cond.wait()
            self._waiting_readers -= 1
            self._reading = True
        try:
            yield
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()


class CachedState:
    """Depth estimates and breaker states for the event loop, refreshed by one thread.

    The thread starts with the first request and stops after ``IDLE_STOP_S`` without one, so an
    app that is dropped (tests build many) leaves nothing polling Redis.
    """

    def __init__(self, producer: Any, client_limit: RateLimitConfig, *,
                 refresh_s: float = 0.05) -> None:
        self.producer = producer
        self.refresh_s = refresh_s
        self.local_limit = RateLimiter("api-client-local", client_limit, MemoryStore())
        gate = producer.deferral
        self._breakers = dict(gate.breakers) if gate is not None else {}
        self.breaker_states: dict[str, BreakerState] = {}
        self.gate = _PublishGate()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_used = time.monotonic()

    # -- on the event loop
    def rate_limit(self, client: str | None, queue: str, priority: Priority) -> None:
        """Raise RateLimited if ``client`` is over its rate in this process."""
        if client is None or self.producer.limiter is None:
            return
        allowed, retry_after = self.local_limit.try_acquire(client)
        if not allowed:
            metrics.refused(queue, priority.name.lower(), "rate_limited").inc()
            raise RateLimited(f"api-client: rate limited key {client!r}",
                              retry_after=retry_after, dependency="api-client")

    def breaker_open(self, task: str) -> bool:
        """Whether the task's dependency defers (queue-for-later) and its breaker is OPEN."""
        gate = self.producer.deferral
        if gate is None:
            return False
        self._touch()
        dependency = gate.dependency_for(task)
        return self.breaker_states.get(dependency or "") is BreakerState.OPEN

    def depth_decision(self, queue: str, priority: Priority, pending: int = 0
                       ) -> Decision | None:
        """The throttle's decision from the cached depth, or None if there is no fresh one.
        ``pending``: jobs of the same batch already admitted to ``queue``, not yet published."""
        throttle = self.producer.throttle
        if throttle is None:
            return Decision(True, queue, priority, None, 1.0, 0.0)
        self._touch()
        seen = throttle.cache.peek(queue)
        if seen is None or seen[1] > STALE_S:
            return None
        est = seen[0]
        if pending:
            est = dataclasses.replace(est, published_since=est.published_since + pending)
        return throttle.judge(queue, priority, est)

    # -- the refresher
    def _touch(self) -> None:
        self._last_used = time.monotonic()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                                    name="tidegate-api-state")
                    self._thread.start()

    def refresh(self) -> None:
        """Read every work queue's depth and every deferring breaker's state once."""
        throttle = self.producer.throttle
        if throttle is not None:
            for queue in self.producer.topology.work_queues:
                # unavailable: the old estimate ages past STALE_S and the lane decides
                with contextlib.suppress(DepthUnavailable), self.gate.read():
                    throttle.cache.estimate(queue)
        for name, breaker in self._breakers.items():
            try:
                self.breaker_states[name] = breaker.state
            except Exception as exc:  # a store error must not stop the refresher
                log.debug("breaker %s state unavailable: %s", name, exc)

    def close(self) -> None:
        """Stop the refresher (the app is shutting down); a later request starts it again."""
        self._last_used = -math.inf

    def _refresh_loop(self) -> None:
        while time.monotonic() - self._last_used < IDLE_STOP_S:
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # keep refreshing; say it once per failure, not per request
                log.warning("api admission state refresh failed", exc_info=True)
            time.sleep(max(0.0, self.refresh_s - (time.monotonic() - started)))
        with self._lock:
            self._thread = None
