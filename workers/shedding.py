"""Load shedding where the load is: a worker drops what it takes from its queue when it is
behind, LOW first, then MEDIUM, then HIGH, never CRITICAL.

The producers shed at the door by queue depth (:mod:`producers.backpressure`); this is the
other end. A worker is overloaded when both hold at once:

* its own slots are taken: ``in_flight / concurrency`` (this delivery included), where
  ``in_flight`` counts the resilient deliveries running in this process;
* what it takes from the queue is old: the message waited ``age`` of its ``budget``, where
  the budget is the job's deadline (``tidegate_deadline``, counted from its enqueue time) or,
  without one, the queue's ``[shedding] max_age_s`` where the policy file sets one. A job
  with neither is never shed by age: a backlog left by an outage is work its users still
  want, and dead-lettering it would turn every outage into replays. A retry's wait counts
  from when its countdown ended; a DLQ replay's from the replay.

    load = (in_flight / concurrency) * (age / budget)

Neither alone is overload: a full worker taking fresh messages keeps up; an old message taken
by a worker with free slots is the tail of a backlog that is gone (dropping it frees nothing).
The load is then admitted by :class:`resilience.shedding.LoadShedder`, the chain's shedder
(the same thresholds, the same "CRITICAL is never shed", the same ``LoadShed`` event), at
the one place a worker can shed without waste: before the task body runs. Inside the chain
(``Policy``'s shedding layer) a shed would come after earlier steps ran and turn into a
broker retry; here nothing has run, so the job is dead-lettered with reason ``shed`` (see
docs/resilience.md for why not a countdown) and ``tidegate dlq replay`` brings it back.

Per process: a threads pool counts all its slots; a prefork child is one slot (it runs one
task), so there the age alone decides.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import signals
from prometheus_client import Counter as PromCounter

from resilience.errors import ConfigError, Shed
from resilience.metrics import get_or_create
from resilience.shedding import LoadShedder, Priority, SheddingThresholds

__all__ = ["CALM", "LOAD", "SHED", "QueueShedder", "ShedRule", "WorkerLoad", "message_age"]

CALM = 0.5  # a spell of shedding ends at a message taken below half the LOW threshold

log = logging.getLogger("tidegate.shedding")

SHED = get_or_create(
    PromCounter, "tidegate_worker_shed_total",
    "Jobs a worker took from its queue and dead-lettered unrun (reason shed) because it was "
    "overloaded, by queue and priority.", ("queue", "priority"))


@dataclass(frozen=True)
class ShedRule:
    """One queue's worker-side shedding (``[shedding]`` / ``[shedding.QUEUE]``)."""

    max_age_s: float | None = None  # the budget of a job without a deadline (None: no budget)
    thresholds: SheddingThresholds = field(default_factory=SheddingThresholds)
    enabled: bool = True

    def __post_init__(self) -> None:
        v = self.max_age_s
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or v <= 0:
            raise ConfigError(f"max_age_s must be > 0, got {v!r}")


class WorkerLoad:
    """This process's resilient deliveries in flight against its slots (thread-safe)."""

    def __init__(self, concurrency: int | None = None) -> None:
        self.concurrency = concurrency  # None: not a worker (eager calls): never overloaded
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def utilisation(self) -> float:
        if not self.concurrency:
            return 0.0
        return min(1.0, self._in_flight / self.concurrency)


LOAD = WorkerLoad()


def _worker_started(sender: Any = None, **_: Any) -> None:
    """The worker's slots (``-c``): a threads pool runs them all in this process."""
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency >= 1:
        LOAD.concurrency = concurrency


def _child_started(**_: Any) -> None:
    """A prefork child runs one task at a time: it is one slot."""
    LOAD.concurrency = 1


signals.worker_init.connect(_worker_started, weak=False)
signals.worker_process_init.connect(_child_started, weak=False)


def _epoch(value: Any) -> float | None:
    """Epoch seconds from a header number or Celery's ISO ``eta``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def message_age(enqueued_at: Any, eta: Any, deadline: Any, max_age_s: float | None,
                now: float) -> tuple[float, float] | None:
    """``(waited, budget)`` of a message, or None when it has no age to shed by (its enqueue
    time is unknown, or it has no deadline and the queue no ``max_age_s``).

    With a deadline the budget is the job's whole life (deadline - enqueue time) and the wait
    counts from the enqueue; without one the budget is the queue's ``max_age_s`` and the wait
    counts from when the message became deliverable (a retry's countdown is not waiting)."""
    start = _epoch(enqueued_at)
    if start is None:
        return None
    end = _epoch(deadline)
    if end is not None and end > start:
        return max(0.0, now - start), end - start
    if max_age_s is None:
        return None
    ready = max(start, _epoch(eta) or start)
    return max(0.0, now - ready), max_age_s


@dataclass(frozen=True)
class Verdict:
    """Why a message was shed, for the DLQ record and the job status."""

    load: float
    waited_s: float
    budget_s: float
    in_flight: int
    concurrency: int


class QueueShedder:
    """Admission of one queue's messages in one worker process, with its start/end log."""

    def __init__(self, queue: str, rule: ShedRule, load: WorkerLoad = LOAD,
                 clock: Any = time.time) -> None:
        self.queue = queue
        self.rule = rule
        self.worker_load = load
        self.clock = clock
        self.shedder = LoadShedder(lambda: 0.0, rule.thresholds)
        self._lock = threading.Lock()
        self._since: float | None = None  # shedding since (None: not shedding)
        self._counts: Counter[str] = Counter()

    def admit(self, priority: Priority, enqueued_at: Any, eta: Any, deadline: Any) -> None:
        """Raise :class:`Shed` (with a :class:`Verdict` as ``verdict``) when this message is
        to be shed; count it and log the start of a shedding spell once."""
        if not self.rule.enabled:
            return
        now = self.clock()
        age = message_age(enqueued_at, eta, deadline, self.rule.max_age_s, now)
        if age is None:
            return
        waited, budget = age
        share = self.worker_load.utilisation()
        load = share * waited / budget
        try:
            self.shedder.admit(priority, load)
        except Shed as exc:
            verdict = Verdict(round(load, 3), round(waited, 3), round(budget, 3),
                              self.worker_load.in_flight, self.worker_load.concurrency or 0)
            name = priority.name.lower()
            SHED.labels(queue=self.queue, priority=name).inc()
            self._spell(now, shed=name, load=load)
            raise Shed(
                f"worker overloaded: waited {waited:.1f}s of {budget:.1f}s with "
                f"{verdict.in_flight}/{verdict.concurrency} slots busy (load {load:.2f}); "
                f"{priority.name} is shed from {self.rule.thresholds.threshold(priority):.2f}",
                priority=priority, retry_after=exc.retry_after) from None
        if load < self.rule.thresholds.low * CALM:
            self._spell(now, shed=None, load=load)

    def _spell(self, now: float, *, shed: str | None, load: float) -> None:
        """One INFO line when a spell of shedding starts and one when it ends (a message
        taken well below the lowest threshold: ``CALM`` of it, so a load hovering around the
        threshold does not start and end a spell every few messages), never one per job."""
        with self._lock:
            if shed is not None:
                self._counts[shed] += 1
                if self._since is not None:
                    return
                self._since = now
            elif self._since is None:
                return
            else:
                since, counts = self._since, dict(self._counts)
                self._since, self._counts = None, Counter()
        if shed is not None:
            log.info("queue %s: worker overloaded, shedding started (load %.2f; LOW from "
                     "%.2f, MEDIUM from %.2f, HIGH from %.2f, CRITICAL never)", self.queue,
                     load, self.rule.thresholds.low, self.rule.thresholds.medium,
                     self.rule.thresholds.high)
            return
        shed_list = ", ".join(f"{p} {counts[p]}" for p in ("low", "medium", "high")
                              if counts.get(p))
        log.info("queue %s: shedding ended after %.1fs (load %.2f); shed %s", self.queue,
                 now - since, load, shed_list or "none")
