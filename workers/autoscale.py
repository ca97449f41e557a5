"""How many workers each queue wants: the figure the exporter publishes for KEDA/HPA.

The formula (AWS's "backlog per instance" rule, read the way KEDA's ``AverageValue`` target
reads it)::

    throughput_per_worker = worker_concurrency / processing_s         # tasks per second
    target_per_worker     = max(1, floor(acceptable_wait_s * throughput_per_worker))
    backlog               = ready + in_flight                         # delayed (ETA) excluded
    raw                   = ceil(backlog / target_per_worker)         # HPA: ceil(total / avg)
    desired               = clamp(raw, min_workers, max_workers)
    published             = max(desired over the last scale_down_window_s)   # stabilisation

* ``processing_s`` is the observed mean task time of the queue (workers record it in Redis,
  :class:`ProcessingTimes`); until there is an observation the configured
  ``default_processing_s`` stands in.
* In-flight messages count: they occupy a worker now, and leaving them out would tell the
  autoscaler to remove the very workers that are busy (KEDA's SQS scaler counts them too).
* Delayed messages (countdown/ETA retries) do not: nobody can work on them yet.
* With ``min_workers = 0`` an empty queue gives 0 (KEDA's activation: scale to zero).
* Stabilisation is the Kubernetes HPA's scale-down rule: the published figure is the highest
  recommendation of the window, so a brief dip never removes workers, while a rise is
  published at once (it is the highest).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilience.clock import SYSTEM_CLOCK, Clock
from resilience.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "Autoscaler",
    "ProcessingTimes",
    "ScalingPolicy",
    "Stabiliser",
    "desired_workers",
    "load_scaling_policies",
    "record_processing_times",
    "target_backlog_per_worker",
]


@dataclass(frozen=True)
class ScalingPolicy:
    """How one queue scales. Defaults suit a worker started with ``-c 4``."""

    acceptable_wait_s: float = 30.0
    default_processing_s: float = 1.0
    worker_concurrency: int = 4
    min_workers: int = 1
    max_workers: int = 20
    scale_down_window_s: float = 300.0

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"autoscaling {msg}")

        for name in ("acceptable_wait_s", "default_processing_s"):
            value = getattr(self, name)
            check(isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")
        for name in ("worker_concurrency", "max_workers"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} must be an integer >= 1, got {value!r}")
        check(isinstance(self.min_workers, int) and not isinstance(self.min_workers, bool)
              and 0 <= self.min_workers <= self.max_workers,
              f"min_workers must be an integer in [0, max_workers={self.max_workers}], "
              f"got {self.min_workers!r}")
        w = self.scale_down_window_s
        check(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
              and w >= 0, f"scale_down_window_s must be >= 0, got {w!r}")


def target_backlog_per_worker(policy: ScalingPolicy, processing_s: float | None) -> int:
    """Messages one worker may have waiting and still meet the acceptable wait."""
    seconds = processing_s if processing_s and processing_s > 0 else policy.default_processing_s
    throughput = policy.worker_concurrency / seconds
    return max(1, math.floor(policy.acceptable_wait_s * throughput))


def desired_workers(backlog: int, target_per_worker: int, policy: ScalingPolicy) -> int:
    """ceil(backlog / target), clamped to [min_workers, max_workers] (no stabilisation)."""
    if backlog < 0:
        raise ConfigError(f"backlog must be >= 0, got {backlog!r}")
    if target_per_worker < 1:
        raise ConfigError(f"target backlog per worker must be >= 1, got {target_per_worker!r}")
    raw = math.ceil(backlog / target_per_worker)
    return min(policy.max_workers, max(policy.min_workers, raw))


class Stabiliser:
    """HPA scale-down stabilisation: publish the highest recommendation of the window."""

    def __init__(self, window_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.window_s = window_s
        self.clock = clock
        self._history: deque[tuple[float, int]] = deque()

    def __call__(self, recommendation: int) -> int:
        now = self.clock.now()
        history = self._history
        history.append((now, recommendation))
        while history and history[0][0] < now - self.window_s:
            history.popleft()
        return max(r for _, r in history)


@dataclass(frozen=True)
class ScalingDecision:
    """One queue's figures at one instant, as the exporter and the CLI print them."""

    queue: str
    backlog: int
    processing_s: float
    observed: bool  # processing_s came from workers, not from the configured default
    target_per_worker: int
    recommended: int  # clamped, before stabilisation
    desired: int  # what to run now


class Autoscaler:
    """Desired workers per queue, with a stabilisation window per queue. Thread-safe."""

    def __init__(
        self,
        policies: Mapping[str, ScalingPolicy] | None = None,
        default: ScalingPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.policies = dict(policies or {})
        self.default = default or ScalingPolicy()
        self.clock = clock
        self._stabilisers: dict[str, Stabiliser] = {}
        self._lock = threading.Lock()

    def policy(self, queue: str) -> ScalingPolicy:
        return self.policies.get(queue, self.default)

    def decide(self, queue: str, backlog: int,
               processing_s: float | None = None) -> ScalingDecision:
        policy = self.policy(queue)
        target = target_backlog_per_worker(policy, processing_s)
        recommended = desired_workers(backlog, target, policy)
        with self._lock:
            stab = self._stabilisers.get(queue)
            if stab is None:
                stab = self._stabilisers[queue] = Stabiliser(policy.scale_down_window_s,
                                                             self.clock)
            desired = stab(recommended)
        observed = bool(processing_s and processing_s > 0)
        return ScalingDecision(queue, backlog,
                               processing_s if observed else policy.default_processing_s,
                               observed, target, recommended, desired)


def load_scaling_policies(path: Path) -> tuple[ScalingPolicy, dict[str, ScalingPolicy]]:
    """``[autoscaling]`` (defaults for every queue) and ``[autoscaling.QUEUE]`` tables.

    Both are optional; a queue table overrides only the keys it names. The whole file is
    checked (:mod:`workers.policy_file`): unknown keys and queues are ConfigErrors naming them.
    """
    from workers.policy_file import load_policy_file

    parsed = load_policy_file(path)
    return parsed.scaling_default, dict(parsed.scaling)


class ProcessingTimes:
    """Recent task durations per queue, kept in Redis so the exporter sees every worker's.

    One capped list per queue (the last ``keep`` durations, expiring ``ttl_s`` after the last
    write): the mean of recent tasks, not of all time, so a provider that slows down raises
    the figure within ``keep`` tasks.

    :meth:`observe` only buffers: a timer writes what has gathered ``flush_s`` after the first
    unwritten observation, one pipeline for all queues, so a busy worker sends one write a
    second instead of one transaction per task (that cost every task about as much worker
    CPU as a bare no-op task's own INCR). A figure is at most ``flush_s`` late; a SIGKILLed
    worker loses at most ``flush_s`` of observations, which only makes the mean less recent.
    """

    def __init__(self, client: Any, prefix: str = "tidegate", *, keep: int = 200,
                 ttl_s: int = 3600, flush_s: float = 1.0) -> None:
        self.client = client
        self.prefix = prefix
        self.keep = keep
        self.ttl_s = ttl_s
        self.flush_s = flush_s
        self._pending: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def key(self, queue: str) -> str:
        return f"{self.prefix}:autoscale:processing:{queue}"

    def observe(self, queue: str, seconds: float) -> None:
        """Buffer one duration; it reaches Redis within ``flush_s``."""
        with self._lock:
            self._pending.setdefault(queue, []).append(f"{max(0.0, seconds):.6f}")
            if self._timer is None:
                self._timer = threading.Timer(self.flush_s, self._flush_from_timer)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write the buffered durations now (the timer does it; call it at shutdown too)."""
        with self._lock:
            batch, self._pending = self._pending, {}
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if not batch:
            return
        pipe = self.client.pipeline(transaction=False)
        for queue, values in batch.items():
            key = self.key(queue)
            pipe.lpush(key, *values[-self.keep:])  # newest at the head, as LRANGE reads it
            pipe.ltrim(key, 0, self.keep - 1)
            pipe.expire(key, self.ttl_s)
        pipe.execute()

    def _flush_from_timer(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # Redis away: these observations are dropped, not retried
            log.warning("processing times not recorded: %s", exc)

    def mean(self, queue: str) -> float | None:
        values = [float(v) for v in self.client.lrange(self.key(queue), 0, -1)]
        return sum(values) / len(values) if values else None


def record_processing_times(app: Any, times: ProcessingTimes) -> None:
    """Feed ``times`` from a Celery app's task signals (call it where the worker starts).

    Durations are measured in the worker around the task body; the queue is the delivery's
    routing key. A Redis error is logged, never raised into the task.
    """
    from celery import signals

    started: dict[str, tuple[float, str]] = {}
    lock = threading.Lock()

    def prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task is None or task.app is not app or task_id is None:
            return
        info = getattr(task.request, "delivery_info", None) or {}
        queue = info.get("routing_key") or info.get("queue")
        if queue:
            with lock:
                started[task_id] = (time.monotonic(), queue)

    def postrun(task_id: str | None = None, **_: Any) -> None:
        with lock:
            entry = started.pop(task_id, None) if task_id else None
        if entry is None:
            return
        begun, queue = entry
        try:
            times.observe(queue, time.monotonic() - begun)
        except Exception as exc:  # never fail a task because Redis is away
            log.warning("could not record processing time for %s: %s", queue, exc)

    def shutdown(**_: Any) -> None:
        try:
            times.flush()
        except Exception as exc:
            log.warning("processing times: final flush failed: %s", exc)

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    signals.worker_process_shutdown.connect(shutdown, weak=False)
    signals.worker_shutdown.connect(shutdown, weak=False)
