"""One reading of the whole system: what the exporter, ``tidegate depth`` and the status page show.

Per work queue: depth (ready, in flight, delayed, oldest age, consumers), its dead-letter
queue's depth, the deferred count, the desired workers, the workers alive on it and the work
held by dead ones until the orphan sweep restores it (:mod:`workers.liveness`); per
dependency: the shared breaker state; and the cluster-wide counters
(:mod:`workers.cluster_metrics`).

A reading is cached for ``ttl_s`` and taken by one caller at a time, so a scrape storm (two
Prometheus replicas, a status page left open on ten screens) costs the broker one probe per
queue per TTL. A probe that fails marks that queue's figures ``None`` with the error beside
them; it never hides the other queues.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from resilience.errors import TidegateError
from resilience.policy import PolicyConfig
from resilience.stores import RedisStore, redis_client
from workers.autoscale import Autoscaler, ProcessingTimes, load_scaling_policies
from workers.brokers import broker_for
from workers.cluster_metrics import read_cluster_counters
from workers.depth import DepthProbe, QueueDepth, probe_for
from workers.latency_share import read_concurrency, read_latency, verdict
from workers.liveness import Registry, live_per_queue
from workers.settings import Settings
from workers.topology import Topology, load_topology

__all__ = ["BreakerView", "ConcurrencyView", "Observer", "QueueView", "Snapshot",
           "deferred_counter"]

log = logging.getLogger(__name__)

STATE_TIMEOUT_S = 1.0

DeferredCount = Callable[[str], "int | None"]


@dataclass(frozen=True)
class QueueView:
    name: str
    ready: int | None
    in_flight: int | None
    delayed: int | None
    oldest_age_s: float | None
    consumers: int | None
    source: str | None
    dead_letter: int | None
    deferred: int | None
    backlog: int | None  # ready + in flight: what the autoscaler sizes for
    desired_workers: int | None
    target_per_worker: int | None
    processing_s: float | None
    processing_observed: bool
    error: str | None = None
    live_workers: int | None = None  # workers with a live heartbeat consuming it
    orphaned: int | None = None  # unacked, held by workers whose heartbeat expired (Redis)
    # of in_flight, retries a worker holds until their countdown ends (Redis; else None)
    held_retries: int | None = None
    capacity: int | None = None  # tasks the live workers run at once (their pool sizes summed)


@dataclass(frozen=True)
class BreakerView:
    dependency: str
    queue: str
    state: str  # closed, open, half_open, or unknown (state store unreachable)
    retry_after_s: float


@dataclass(frozen=True)
class LatencyView:
    """A dependency's configured timeout against its observed P99 (shared by the workers)."""

    dependency: str
    timeout_s: float
    p99_s: float | None = None  # None: no worker has published a window lately
    suggested_timeout_s: float | None = None  # P99 x 2
    samples: int = 0
    warning: str | None = None  # the timeout is below P99 x 2 or above 4 x P99


@dataclass(frozen=True)
class ConcurrencyView:
    """A dependency's adaptive concurrency limit, over the worker processes that share it."""

    dependency: str
    min: int  # the policy file's bounds, per process
    max: int
    limit: int | None = None  # summed over processes; None: none has published lately
    in_flight: int | None = None  # summed
    waiting: int | None = None  # summed
    baseline_s: float | None = None  # the lowest process's baseline
    processes: int = 0


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # epoch seconds
    queues: tuple[QueueView, ...]
    breakers: tuple[BreakerView, ...]
    counters: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    latency: tuple[LatencyView, ...] = ()
    concurrency: tuple[ConcurrencyView, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "queues": [asdict(q) for q in self.queues],
            "breakers": [asdict(b) for b in self.breakers],
            "latency": [asdict(v) for v in self.latency],
            "concurrency": [asdict(v) for v in self.concurrency],
            "counters": {k: [{"labels": lb, "value": v} for lb, v in rows]
                         for k, rows in self.counters.items()},
            "errors": list(self.errors),
        }


DEFERRED_TTL_S = 5.0  # how long a deferred count from SQS is reused


def deferred_counter(settings: Settings, topology: Topology) -> DeferredCount | None:
    """Requests queued for later on SQS, per work queue (None where nothing queues for later).

    The count is every entry of the queue's queue-for-later dependencies (visible, in flight,
    delayed), read from :mod:`workers.deferral`'s stores. Off (None) unless SQS is configured
    (``TIDEGATE_SQS_ENDPOINT_URL``, AWS keys, or an SQS broker): no probe waits on an SQS
    endpoint that was never set up.
    """
    if not (settings.sqs_endpoint_url or settings.aws_access_key_id
            or broker_for(settings).provides_sqs):
        return None
    from workers import deferral

    by_queue: dict[str, list[str]] = {}
    for name in deferral.queueing_dependencies(topology):
        by_queue.setdefault(topology.dependency(name).queue, []).append(name)

    seen: dict[str, tuple[float, int]] = {}

    def count(queue: str) -> int | None:
        names = by_queue.get(queue)
        if not names:
            return None
        # SQS's counts are approximate and lag anyway: asking twice a second per queue only
        # filled the SQS endpoint's log (every request is a line there)
        now = time.monotonic()
        if queue in seen and now - seen[queue][0] < DEFERRED_TTL_S:
            return seen[queue][1]
        total = sum(deferral.store_for(n, settings, topology).stats().total for n in names)
        seen[queue] = (now, total)
        return total

    return count


class Observer:
    """Takes (and caches) snapshots. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology | None = None,
        *,
        probe: DepthProbe | None = None,
        autoscaler: Autoscaler | None = None,
        state_client: Any = None,
        deferred: DeferredCount | None = None,
        liveness_client: Any = None,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.topology = topology or load_topology(settings.policy_file)
        self.probe = probe or probe_for(settings, self.topology)
        if autoscaler is None:
            default, per_queue = load_scaling_policies(settings.policy_file)
            autoscaler = Autoscaler(per_queue, default)
        self.autoscaler = autoscaler
        self.state = state_client or redis_client(
            settings.redis_url, socket_timeout=STATE_TIMEOUT_S,
            socket_connect_timeout=STATE_TIMEOUT_S)
        self.store = RedisStore(self.state, name="exporter")
        self.processing = ProcessingTimes(self.state)
        self.deferred = (deferred if deferred is not None
                         else deferred_counter(settings, self.topology))
        # heartbeats live in the broker's Redis on a Redis broker, else in the state Redis
        broker = broker_for(settings)
        self.broker_redis = broker.heartbeats_in_broker
        self.liveness = liveness_client or (
            broker.client(settings, timeout_s=STATE_TIMEOUT_S) if self.broker_redis
            else self.state)
        configs = {d.name: PolicyConfig.from_mapping(d.name, d.policy)
                   for d in self.topology.dependencies}
        self.breaker_configs = {d.name: (d.queue, configs[d.name].breaker)
                                for d in self.topology.dependencies}
        self.timeouts = {name: cfg.timeout for name, cfg in configs.items()}
        self.adaptive = {name: cfg.adaptive_limit for name, cfg in configs.items()
                         if cfg.adaptive_limit is not None}
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    # -- reading
    def snapshot(self) -> Snapshot:
        """The latest snapshot, at most ``ttl_s`` old."""
        with self._lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            snap = self._take()
            self._cached = (self.clock(), snap)
            return snap

    def _depths(self, names: list[str]) -> dict[str, QueueDepth | Exception]:
        many = getattr(self.probe, "depths", None)
        if callable(many):
            try:
                return dict(many(names))
            except Exception as exc:
                return dict.fromkeys(names, exc)
        out: dict[str, QueueDepth | Exception] = {}
        for name in names:
            try:
                out[name] = self.probe.depth(name)
            except Exception as exc:  # DepthUnavailable and its like: shown, not raised
                out[name] = exc
        return out

    def _take(self) -> Snapshot:
        errors: list[str] = []
        queues = list(self.topology.work_queues)
        dlqs = [self.topology.dead_letter_queue(q) for q in queues]
        depths = self._depths(queues + dlqs)
        live, capacity, orphaned = self._liveness(queues, errors)
        views = [replace(self._queue_view(q, depths[q], depths[dlq], errors),
                         live_workers=live.get(q), orphaned=orphaned.get(q),
                         capacity=capacity.get(q))
                 for q, dlq in zip(queues, dlqs, strict=True)]
        breakers = self._breakers(errors)
        try:
            counters = read_cluster_counters(self.state)
        except Exception as exc:
            errors.append(f"cluster counters: {_one_line(exc)}")
            counters = {}
        latency = self._latency(errors)
        concurrency = self._concurrency(errors)
        return Snapshot(time.time(), tuple(views), tuple(breakers), counters, tuple(errors),
                        tuple(latency), tuple(concurrency))

    def _concurrency(self, errors: list[str]) -> list[ConcurrencyView]:
        if not self.adaptive:
            return []
        try:
            observed = read_concurrency(self.state)
        except Exception as exc:
            errors.append(f"adaptive limits: {_one_line(exc)}")
            observed = {}
        views = []
        for name, cfg in self.adaptive.items():
            seen = observed.get(name)
            if seen is None:
                views.append(ConcurrencyView(name, cfg.min, cfg.max))
                continue
            baseline = None if seen.baseline_s is None else round(seen.baseline_s, 6)
            views.append(ConcurrencyView(name, cfg.min, cfg.max, seen.limit, seen.in_flight,
                                         seen.waiting, baseline, seen.processes))
        return views

    def _latency(self, errors: list[str]) -> list[LatencyView]:
        try:
            observed = read_latency(self.state)
        except Exception as exc:
            errors.append(f"latency windows: {_one_line(exc)}")
            observed = {}
        views = []
        for name, timeout in self.timeouts.items():
            seen = observed.get(name)
            if seen is None:
                views.append(LatencyView(name, timeout))
                continue
            views.append(LatencyView(name, timeout, round(seen.p99_s, 6),
                                     round(seen.suggested_timeout_s, 6), seen.samples,
                                     verdict(timeout, seen.p99_s)))
        return views

    def _liveness(self, queues: list[str], errors: list[str]
                  ) -> tuple[dict[str, int], dict[str, int | None], dict[str, int]]:
        """Live workers and their capacity per queue; on Redis, unacked messages held by dead
        workers."""
        try:
            live, capacity = live_per_queue(Registry(self.liveness), queues)
            orphaned: dict[str, int] = {}
            if self.broker_redis:
                from workers.orphans import orphaned_per_queue

                orphaned = orphaned_per_queue(self.liveness, set(queues))
            return live, capacity, orphaned
        except Exception as exc:
            errors.append(f"worker heartbeats: {_one_line(exc)}")
            return {}, {}, {}

    def _queue_view(self, name: str, depth: QueueDepth | Exception,
                    dlq: QueueDepth | Exception, errors: list[str]) -> QueueView:
        dead_letter = dlq.ready + (dlq.in_flight or 0) if isinstance(dlq, QueueDepth) else None
        deferred = None
        if self.deferred is not None:
            try:
                deferred = self.deferred(name)
            except Exception as exc:
                errors.append(f"deferred count for {name}: {_one_line(exc)}")
        if not isinstance(depth, QueueDepth):
            message = _one_line(depth)
            errors.append(f"{name}: {message}")
            return QueueView(name, None, None, None, None, None, None, dead_letter, deferred,
                             None, None, None, None, False, message)
        backlog = depth.ready + (depth.in_flight or 0)
        try:
            processing = self.processing.mean(name)
        except Exception as exc:
            errors.append(f"processing time for {name}: {_one_line(exc)}")
            processing = None
        decision = self.autoscaler.decide(name, backlog, processing)
        return QueueView(
            name, depth.ready, depth.in_flight, depth.delayed, depth.oldest_age_s,
            depth.consumers, depth.source, dead_letter, deferred, backlog, decision.desired,
            decision.target_per_worker, decision.processing_s, decision.observed,
            held_retries=depth.held_retries)

    def _breakers(self, errors: list[str]) -> list[BreakerView]:
        views = []
        for name, (queue, cfg) in self.breaker_configs.items():
            snap = self.store.breaker_read(name, cfg)
            if self.store.degraded:
                # The store answered from local memory: that is not the cluster's state.
                views.append(BreakerView(name, queue, "unknown", 0.0))
                continue
            views.append(BreakerView(name, queue, snap.state, round(snap.retry_after, 3)))
        if self.store.degraded:
            errors.append("state store unreachable: breaker states unknown")
        return views


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, TidegateError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())
