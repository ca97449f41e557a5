"""Queue depth, read the same way from Redis, RabbitMQ and SQS, and shared between processes.

Depth is Tidegate's backpressure signal (producers throttle on it) and its autoscaling signal
(the exporter publishes it). Each broker's adapter (:mod:`workers.brokers`) has its probe,
exact where the broker allows and ``None`` where it cannot know (never a guess dressed up as
a number):

=========  ==================================  ==================  ======================
broker     ready                               in flight           oldest message age
=========  ==================================  ==================  ======================
Redis      LLEN of the list + priority lists   kombu ``unacked``   enqueue-time header at
           (``q`` and ``q<sep>3/6/9``)         hash, per queue     the tail (next to pop)
RabbitMQ   passive ``queue.declare``           management API      None (AMQP cannot peek)
SQS        ApproximateNumberOfMessages         ...NotVisible       None (not exposed)
=========  ==================================  ==================  ======================

:class:`SharedDepthCache` puts one reading per queue per TTL in Redis, so a hundred producers
cost the broker one probe per TTL, and estimates the drain rate (messages/s consumed) from a
shared publish counter and successive readings; Retry-After is computed from it.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from resilience.errors import ConfigError, TransientError

if TYPE_CHECKING:
    from workers.settings import Settings
    from workers.topology import Topology

__all__ = [
    "DepthProbe",
    "DepthUnavailable",
    "QueueDepth",
    "SharedDepthCache",
    "flush_all",
    "probe_for",
]


class DepthUnavailable(TransientError):
    """The broker could not be asked (unreachable, timed out, or the queue does not exist)."""


@dataclass(frozen=True)
class QueueDepth:
    """One reading of one queue. ``None`` means the broker cannot tell, not zero."""

    queue: str
    ready: int  # waiting to be delivered
    in_flight: int | None  # delivered to a consumer, not yet acked
    delayed: int | None  # published but not yet deliverable (SQS DelaySeconds)
    oldest_age_s: float | None  # age of the message that waits longest
    consumers: int | None
    source: str  # "redis", "rabbitmq", "rabbitmq+management", "sqs"
    measured_at: float  # epoch seconds
    # of in_flight, the retries a worker holds until their countdown ends (Redis; else None)
    held_retries: int | None = None

    @property
    def backlog(self) -> int:
        """What still has to be delivered: ready plus delayed where known."""
        return self.ready + (self.delayed or 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> QueueDepth:
        return cls(**json.loads(text))


@runtime_checkable
class DepthProbe(Protocol):
    """Reads one queue's depth from the broker; raises :class:`DepthUnavailable`."""

    def depth(self, queue: str) -> QueueDepth: ...


_MOVED = {  # the probes live in their broker's adapter (workers.brokers); old names work
    "RedisDepthProbe": "workers.brokers.redis",
    "RabbitMQDepthProbe": "workers.brokers.rabbitmq",
    "SQSDepthProbe": "workers.brokers.sqs",
    "sqs_queue_name": "workers.brokers.sqs",
    "broker_sqs_config": "workers.brokers.sqs",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def probe_for(settings: Settings, topology: Topology | None = None) -> DepthProbe:
    """The probe for the configured broker (its adapter's, by the broker URL's scheme)."""
    from workers.brokers import broker_for

    return broker_for(settings).depth_probe(settings)


# -- the shared cache and the drain rate ---------------------------------------------------

_REFRESH_LUA = """
-- KEYS: reading, samples, lock ; ARGV: reading json, ttl ms, sample json, keep, window s, now
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[3])  -- the refresh lock: the reading's age now decides
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5]) * 4))
return redis.call('LRANGE', KEYS[2], 0, -1)
"""


@dataclass(frozen=True)
class DepthEstimate:
    """A (possibly cached) reading plus what Tidegate producers published since it."""

    reading: QueueDepth
    published_since: int
    drain_rate: float | None  # messages/s taken off the queue; None until two readings

    @property
    def backlog(self) -> int:
        return self.reading.backlog + self.published_since


class SharedDepthCache:
    """One broker probe per queue per ``ttl_s`` across every process that shares Redis.

    The first caller after expiry takes a ``SET NX`` lock and probes; the others read the
    cached reading (or the stale one while the probe runs). A failing probe keeps the lock
    until it expires, so a broken broker is not asked by every process at once. Producers
    count what they publish (:meth:`record_published`), so :meth:`estimate` is
    ``reading + published since`` and a flood cannot overshoot by a TTL's worth of messages.
    Each refresh stores a sample ``(time, published counter, backlog)``; the drain rate over
    ``window_s`` is ``(published delta - backlog delta) / elapsed``, at least the fall in
    backlog.
    If Redis is down, every process probes for itself (depth stays available).

    The publish path pays no Redis round trip of its own: publishes are counted locally and
    merged into the shared counter every ``flush_s`` (by a background thread, so an idle
    producer's last counts still arrive), and an estimate younger than ``reuse_s`` is reused
    with this process's own publishes added. Another process's publishes are therefore seen
    within ``flush_s + reuse_s`` (0.1 s by default) — well inside one depth TTL. The price: a
    reading taken while other processes hold unflushed counts counts those messages twice until
    the next reading (at most ``flush_s`` of their publishing), so the throttle errs early.
    """

    def __init__(
        self,
        probe: DepthProbe,
        redis_client: Any,
        *,
        ttl_s: float = 0.25,
        window_s: float = 10.0,
        prefix: str = "tidegate:depth",
        clock: Callable[[], float] = time.time,
        flush_s: float = 0.05,
        reuse_s: float = 0.05,
    ) -> None:
        if not ttl_s > 0 or not window_s > ttl_s:
            raise ConfigError("depth cache needs ttl_s > 0 and window_s > ttl_s")
        if not 0 < flush_s <= ttl_s or not 0 <= reuse_s <= ttl_s:
            raise ConfigError("depth cache needs 0 < flush_s <= ttl_s and 0 <= reuse_s <= ttl_s")
        self.flush_s, self.reuse_s = flush_s, reuse_s
        self._lock = threading.Lock()
        # Held across a flush's swap and INCRBY: estimate() flushes first, and must not read
        # the counter while a batch taken by the background thread is still on its way (the
        # probe would already see those messages and they would be counted twice).
        self._flush_lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._published_here: dict[str, int] = {}
        self._recent: dict[str, tuple[DepthEstimate, float, int]] = {}
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self.failing = False  # the last merge failed (its counts are kept for the next)
        self.probe = probe
        self.redis = redis_client
        self.ttl_s = ttl_s
        self.window_s = window_s
        self.prefix = prefix
        self.clock = clock
        self._refresh = redis_client.register_script(_REFRESH_LUA)
        self._local: dict[str, tuple[QueueDepth, float | None]] = {}
        _LIVE_CACHES.add(self)

    def _key(self, queue: str, what: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{what}"

    def record_published(self, queue: str, count: int = 1) -> None:
        """Count messages this process published to ``queue`` (no Redis call; never raises)."""
        with self._lock:
            self._pending[queue] = self._pending.get(queue, 0) + count
            self._published_here[queue] = self._published_here.get(queue, 0) + count
            if self._flusher is None:
                # The thread holds the cache weakly: a dropped producer's cache is collected
                # and its thread ends, instead of living (and flushing) for the process.
                self._flusher = threading.Thread(
                    target=_flush_loop, args=(weakref.ref(self), self._wake, self.flush_s),
                    daemon=True, name="tidegate-depth-flush")
                self._flusher.start()
        self._wake.set()

    def flush(self) -> None:
        """Merge the locally counted publishes into the shared counters now (best effort)."""
        import redis

        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            pending = {q: n for q, n in pending.items() if n}
            if not pending:
                return
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for queue, n in pending.items():
                        pipe.incrby(self._key(queue, "published"), n)
                    pipe.execute()
                self.failing = False
            except (redis.RedisError, OSError):
                self.failing = True
                with self._lock:  # keep them for the next try: the counter only ever grows
                    for queue, n in pending.items():
                        self._pending[queue] = self._pending.get(queue, 0) + n

    def depth(self, queue: str) -> QueueDepth:
        """The freshest shared reading (at most ``ttl_s`` old unless the probe is failing)."""
        return self.estimate(queue).reading

    def estimate(self, queue: str) -> DepthEstimate:
        """Reading + what was published since + drain rate (reused for ``reuse_s``)."""
        now = self.clock()
        with self._lock:
            recent = self._recent.get(queue)
            here = self._published_here.get(queue, 0)
        if recent is not None and now - recent[1] < self.reuse_s:
            est, _, here_then = recent
            return dataclasses.replace(est, published_since=est.published_since + here
                                       - here_then)
        self.flush()  # our own publishes belong in the shared counter before we read it
        est = self._shared_estimate(queue)
        with self._lock:
            self._recent[queue] = (est, now, here)
        return est

    def peek(self, queue: str) -> tuple[DepthEstimate, float] | None:
        """The last estimate with this process's publishes since added, and its age in
        seconds; no I/O (None before the first :meth:`estimate`). For callers that must not
        block, such as an event loop, while something else keeps the estimate fresh."""
        with self._lock:
            recent = self._recent.get(queue)
            here = self._published_here.get(queue, 0)
        if recent is None:
            return None
        est, at, here_then = recent
        return (dataclasses.replace(est, published_since=est.published_since + here - here_then),
                max(0.0, self.clock() - at))

    def _shared_estimate(self, queue: str) -> DepthEstimate:
        """Reading + what was published since + drain rate, in one Redis round trip."""
        import redis

        try:
            raw, published, drain = self.redis.mget(
                self._key(queue, "reading"), self._key(queue, "published"),
                self._key(queue, "drain"))
        except (redis.RedisError, OSError):
            return self._local_estimate(queue)
        published = int(published or 0)
        reading = _parse(raw)
        if reading is None or self.clock() - reading[0].measured_at >= self.ttl_s:
            fresh = self._maybe_refresh(queue, published)
            if fresh is not None:
                return fresh
            if reading is None:  # another process is probing and nothing is cached yet
                return self._direct(queue, published)
        depth, published_at = reading
        return DepthEstimate(depth, max(0, published - published_at),
                             float(drain) if drain is not None else None)

    def drain_rate(self, queue: str) -> float | None:
        """Messages/s consumed from ``queue`` lately (None until two readings exist)."""
        return self.estimate(queue).drain_rate

    def _maybe_refresh(self, queue: str, published: int) -> DepthEstimate | None:
        import redis

        ttl_ms = max(1, int(self.ttl_s * 1000))
        try:
            if not self.redis.set(self._key(queue, "lock"), b"1", nx=True, px=ttl_ms):
                return None
        except (redis.RedisError, OSError):
            return self._local_estimate(queue)
        return self._direct(queue, published)

    def _direct(self, queue: str, published: int) -> DepthEstimate:
        import redis

        depth = self.probe.depth(queue)
        sample = json.dumps([depth.measured_at, published, depth.backlog])
        try:
            samples = self._refresh(
                keys=[self._key(queue, "reading"), self._key(queue, "samples"),
                      self._key(queue, "lock")],
                args=[json.dumps([json.loads(depth.to_json()), published]),
                      int(self.window_s * 4000), sample, 64, self.window_s, depth.measured_at])
            drain = drain_from_samples([json.loads(s) for s in samples], self.window_s)
            if drain is not None:
                self.redis.set(self._key(queue, "drain"), repr(drain),
                               px=int(self.window_s * 4000))
            else:
                cached = self.redis.get(self._key(queue, "drain"))
                drain = float(cached) if cached is not None else None
        except (redis.RedisError, OSError, ValueError):
            drain = None
        return DepthEstimate(depth, 0, drain)

    def _local_estimate(self, queue: str) -> DepthEstimate:
        """Redis is down: probe at most once per TTL in this process."""
        cached = self._local.get(queue)
        now = self.clock()
        if cached is None or now - cached[0].measured_at >= self.ttl_s:
            depth = self.probe.depth(queue)
            drain = None
            if cached is not None and depth.measured_at > cached[0].measured_at:
                drain = max(0.0, (cached[0].backlog - depth.backlog)
                            / (depth.measured_at - cached[0].measured_at)) or cached[1]
            self._local[queue] = cached = (depth, drain)
        return DepthEstimate(cached[0], 0, cached[1])


def _flush_loop(ref: weakref.ref[SharedDepthCache], wake: threading.Event,
                flush_s: float) -> None:
    """A cache's background merges, until the cache is gone (checked every few seconds)."""
    while True:
        if not wake.wait(5.0):
            if ref() is None:
                return
            continue
        wake.clear()
        time.sleep(flush_s)  # gather a batch, then merge it
        cache = ref()
        if cache is None:
            return
        cache.flush()
        del cache


_LIVE_CACHES: weakref.WeakSet[SharedDepthCache] = weakref.WeakSet()


def flush_all(*, skip_failing: bool = False) -> None:
    """Merge every live cache's unflushed publish counts into the shared counters now.

    Runs at interpreter exit (the flusher is a daemon thread: without this a producer's last
    ``flush_s`` of publishes would never reach the counter the drain rate is computed from),
    and lets a test settle every cache before it empties the shared database: a count that
    lands afterwards would be read as messages published since the next reading.
    ``skip_failing`` leaves out caches whose Redis refused their last merge (their own thread
    keeps trying): one whose server is gone would cost a connect timeout per call.
    """
    for cache in list(_LIVE_CACHES):
        if not (skip_failing and cache.failing):
            cache.flush()


atexit.register(flush_all)


def _parse(raw: bytes | None) -> tuple[QueueDepth, int] | None:
    if raw is None:
        return None
    try:
        fields, published = json.loads(raw)
        return QueueDepth(**fields), int(published)
    except (ValueError, TypeError):
        return None


def drain_from_samples(samples: list[list[float]], window_s: float) -> float | None:
    """Drain rate from ``[time, published counter, backlog]`` samples, newest first.

    consumed = published delta - backlog delta; at least the fall in backlog (publishers
    that do not count, e.g. plain ``apply_async``, make the first figure an underestimate).
    """
    if len(samples) < 2:
        return None
    newest = samples[0]
    oldest = None
    for s in samples[1:]:
        if newest[0] - s[0] > window_s:
            break
        oldest = s
    if oldest is None or newest[0] <= oldest[0]:
        return None
    elapsed = newest[0] - oldest[0]
    consumed = (newest[1] - oldest[1]) - (newest[2] - oldest[2])
    rate = max(consumed, oldest[2] - newest[2], 0) / elapsed
    return rate if math.isfinite(rate) else None
