"""Depth-driven admission: producers slow down as a queue fills and shed by priority.

Queue depth is the backpressure signal (seed: "if it grows ... throttle producers"). With
``span = high - low`` and ``load = (depth - low) / span``, each class is admitted with a
probability that falls linearly to zero across its own band of the span (the
:class:`~resilience.shedding.LoadShedder` smooth mode, reused here):

==========  ========================  =============================================
class       admitted with p = 1 up to  p = 0 (shed) from
==========  ========================  =============================================
LOW         the low watermark          low + span/2
MEDIUM      low + span/4               low + 3 span/4
HIGH        low + span/2               the high watermark
CRITICAL    always                     never
==========  ========================  =============================================

So LOW goes first, then MEDIUM, then HIGH, and above the high watermark only CRITICAL is
published. A refused call waits (bounded by ``max_wait``) and asks again: that wait is the
throttle, and it is what makes the admitted rate fall smoothly instead of flapping. When the
wait runs out the call raises :class:`~resilience.errors.Backpressure`, whose ``retry_after``
is the time the queue needs, at its measured drain rate, to fall to where this class is
admitted again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from resilience.errors import Backpressure, ConfigError
from resilience.shedding import LoadShedder, Priority, SheddingThresholds
from workers.depth import DepthEstimate, DepthUnavailable, SharedDepthCache
from workers.topology import Topology

from . import metrics

__all__ = ["BackpressureConfig", "Decision", "Throttle", "load_backpressure"]

log = logging.getLogger(__name__)

# Where each class's admission reaches 0, as a fraction of the span above the low watermark;
# every ramp is half the span wide (see the module docstring's table).
BLIND_S = 1.0  # after a failed depth read, admit without reading for this long

CLASS_BANDS = SheddingThresholds(low=0.5, medium=0.75, high=1.0, ramp=0.5)


@dataclass(frozen=True)
class BackpressureConfig:
    """One queue's watermarks (messages ready + delayed) and how long a caller may wait."""

    low_watermark: int = 1000
    high_watermark: int = 2000
    max_wait_s: float = 1.0  # a throttled call waits at most this long, then Backpressure
    poll_s: float = 0.05  # how often a waiting call asks again (jittered)
    min_retry_after_s: float = 1.0
    max_retry_after_s: float = 300.0  # also the answer when the queue is not draining at all

    def __post_init__(self) -> None:
        for name in ("low_watermark", "high_watermark"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"backpressure {name} must be an integer >= 0, got {value!r}")
        if self.high_watermark <= self.low_watermark:
            raise ConfigError(
                f"backpressure high_watermark ({self.high_watermark}) must exceed "
                f"low_watermark ({self.low_watermark})"
            )
        for name in ("max_wait_s", "poll_s", "min_retry_after_s", "max_retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ConfigError(f"backpressure {name} must be a finite number >= 0")
        if self.poll_s <= 0:
            raise ConfigError("backpressure poll_s must be > 0")
        if self.min_retry_after_s > self.max_retry_after_s:
            raise ConfigError("backpressure min_retry_after_s exceeds max_retry_after_s")

    @property
    def span(self) -> int:
        return self.high_watermark - self.low_watermark

    def load(self, depth: float) -> float:
        """Depth as a fraction of the span above the low watermark (<= 0: full speed)."""
        return (depth - self.low_watermark) / self.span

    def depth_for(self, priority: Priority) -> float:
        """The depth at which ``priority`` is admitted half the time (the Retry-After target)."""
        top = CLASS_BANDS.threshold(priority)
        return self.low_watermark + self.span * (top - CLASS_BANDS.ramp / 2)


FILE_KEYS = {"low_watermark": ("low_watermark", 1), "high_watermark": ("high_watermark", 1),
              "max_wait_ms": ("max_wait_s", 1000), "poll_ms": ("poll_s", 1000),
              "min_retry_after_s": ("min_retry_after_s", 1),
              "max_retry_after_s": ("max_retry_after_s", 1)}


def load_backpressure(
    path: Path, topology: Topology | None = None
) -> tuple[BackpressureConfig, dict[str, BackpressureConfig]]:
    """``[backpressure]`` (defaults) and ``[backpressure.QUEUE]`` tables of the policy file.

    Keyed by queue, not dependency: depth belongs to a queue, and two dependencies may share
    one (pricing is read inside the payments queue). A queue table overrides only what it
    names. The whole file is checked when it loads (:mod:`workers.policy_file`: unknown keys,
    unknown queues, watermark order); ``topology`` is accepted for older callers.
    """
    from workers.policy_file import load_policy_file

    top, per_queue = load_policy_file(path).backpressure_tables()

    def build(values: Mapping[str, Any], where: str) -> BackpressureConfig:
        kw = {}
        for key, value in values.items():
            attr, scale = FILE_KEYS[key]
            kw[attr] = value / scale if scale != 1 else value
        try:
            return BackpressureConfig(**kw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [{where}]: {exc}") from None

    return build(top, "backpressure"), {q: build(v, f"backpressure.{q}")
                                        for q, v in per_queue.items()}


assert {f.name for f in fields(BackpressureConfig)} == {a for a, _ in FILE_KEYS.values()}


@dataclass(frozen=True)
class Decision:
    """One admission check: admitted or not, and when to come back if not."""

    admitted: bool
    queue: str
    priority: Priority
    depth: int | None  # None when the depth could not be read (admitted: fail open)
    probability: float
    retry_after: float


class Throttle:
    """Admission by queue depth for every producer sharing ``cache`` (see module docstring)."""

    def __init__(
        self,
        cache: SharedDepthCache,
        default: BackpressureConfig | None = None,
        per_queue: Mapping[str, BackpressureConfig] | None = None,
        *,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cache = cache
        self.default = default or BackpressureConfig()
        self.per_queue = dict(per_queue or {})
        self.rng = rng
        self.clock = clock
        self.sleep = sleep
        self._shedder = LoadShedder(lambda: 0.0, CLASS_BANDS)
        self._warned_at = -math.inf
        self._blind_until: dict[str, float] = {}

    def config(self, queue: str) -> BackpressureConfig:
        return self.per_queue.get(queue, self.default)

    # -- one check, no waiting
    def decide(self, queue: str, priority: Priority, pending: int = 0) -> Decision:
        """``pending``: messages this caller admitted to ``queue`` but has not published yet
        (a batch), counted as if already on the queue."""
        if priority is Priority.CRITICAL:
            return Decision(True, queue, priority, None, 1.0, 0.0)
        if self.clock() < self._blind_until.get(queue, -math.inf):
            return Decision(True, queue, priority, None, 1.0, 0.0)
        try:
            est = self.cache.estimate(queue)
        except DepthUnavailable as exc:
            # Fail open: the publish itself reports an unreachable broker; a broken depth
            # reading must not stop a healthy pipeline, nor cost every call a probe timeout.
            now = self.clock()
            self._blind_until[queue] = now + BLIND_S
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning("depth of %s unavailable, admitting without throttle for %.0fs: %s",
                            queue, BLIND_S, exc)
            return Decision(True, queue, priority, None, 1.0, 0.0)
        if pending:
            est = dataclasses.replace(est, published_since=est.published_since + pending)
        return self.judge(queue, priority, est)

    def judge(self, queue: str, priority: Priority, est: DepthEstimate) -> Decision:
        """The decision for a depth already read (no I/O: the HTTP API's event loop calls it
        with a cached estimate)."""
        cfg = self.config(queue)
        if priority is Priority.CRITICAL:
            return Decision(True, queue, priority, None, 1.0, 0.0)
        depth = est.backlog
        p = self._shedder.admission_probability(priority, cfg.load(depth))
        if p >= 1.0 or self.rng() < p:
            return Decision(True, queue, priority, depth, p, 0.0)
        return Decision(False, queue, priority, depth, p, self.retry_after(cfg, priority, est))

    def retry_after(self, cfg: BackpressureConfig, priority: Priority,
                    est: DepthEstimate) -> float:
        """Seconds for the queue to drain to where ``priority`` is admitted half the time."""
        excess = est.backlog - cfg.depth_for(priority)
        drain = est.drain_rate
        if excess <= 0:
            seconds = cfg.min_retry_after_s
        elif not drain or drain <= 0:
            seconds = cfg.max_retry_after_s  # nothing is being consumed
        else:
            seconds = excess / drain
        return min(cfg.max_retry_after_s, max(cfg.min_retry_after_s, seconds))

    # -- waiting
    def _wait_budget(self, queue: str, max_wait_s: float | None) -> float:
        return self.config(queue).max_wait_s if max_wait_s is None else max(0.0, max_wait_s)

    def refusal(self, d: Decision, waited: float) -> Backpressure:
        """The Backpressure error for a refused decision (counted in the metrics)."""
        metrics.refused(d.queue, d.priority.name.lower(), "backpressure").inc()
        metrics.THROTTLE_WAIT.labels(queue=d.queue).observe(waited)
        return Backpressure(
            f"{d.queue}: backpressure, priority {d.priority.name} at depth {d.depth}",
            priority=d.priority, retry_after=d.retry_after, dependency=d.queue)

    def _pause(self, cfg: BackpressureConfig, remaining: float) -> float:
        return min(remaining, cfg.poll_s * (0.5 + self.rng()))

    def admit(self, queue: str, priority: Priority, max_wait_s: float | None = None,
              pending: int = 0) -> Decision:
        """Return once admitted; raise Backpressure once ``max_wait_s`` is spent."""
        start = self.clock()
        budget = self._wait_budget(queue, max_wait_s)
        cfg = self.config(queue)
        paused = False
        while True:
            d = self.decide(queue, priority, pending)
            waited = self.clock() - start
            if d.admitted:
                if paused:  # only calls that were really held back count as throttled
                    metrics.THROTTLE_WAIT.labels(queue=queue).observe(waited)
                return d
            remaining = budget - waited
            # Waiting is pointless when the queue needs far longer than we may wait.
            if remaining <= 0 or d.retry_after > 4 * max(budget, cfg.poll_s) + remaining:
                raise self.refusal(d, waited)
            self.sleep(self._pause(cfg, remaining))
            paused = True

    async def admit_async(
        self,
        queue: str,
        priority: Priority,
        max_wait_s: float | None = None,
        run: Callable[..., Awaitable[Any]] | None = None,
        pending: int = 0,
    ) -> Decision:
        """:meth:`admit` for asyncio: the depth read runs in a thread, the wait is a sleep."""
        run = run or asyncio.to_thread
        start = self.clock()
        budget = self._wait_budget(queue, max_wait_s)
        cfg = self.config(queue)
        paused = False
        while True:
            d = await run(self.decide, queue, priority, pending)
            waited = self.clock() - start
            if d.admitted:
                if paused:
                    metrics.THROTTLE_WAIT.labels(queue=queue).observe(waited)
                return d
            remaining = budget - waited
            if remaining <= 0 or d.retry_after > 4 * max(budget, cfg.poll_s) + remaining:
                raise self.refusal(d, waited)
            await asyncio.sleep(self._pause(cfg, remaining))
            paused = True
