"""``tidegate exporter``: queue depth, desired workers and breaker states for Prometheus/KEDA.

A custom collector reads an :class:`~tidegate.snapshot.Observer` on scrape; the observer's
TTL cache bounds how often the broker is probed however many scrapers there are. A sampler
thread also takes a snapshot every ``interval_s`` so the status page has history and the
autoscaler's stabilisation window sees a steady stream of readings.

Served on one port: ``/metrics`` (Prometheus text), ``/`` (the status page, see
:mod:`tidegate.status`), ``/api/status`` (JSON) and ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from resilience.shedding import Priority
from tidegate.snapshot import Observer, Snapshot
from workers.jobs import FINAL  # the outcomes a task can end in

__all__ = ["DepthCollector", "Sampler", "build_registry", "serve"]

log = logging.getLogger(__name__)

BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}
REJECTION_REASONS = ("rate_limited", "circuit_open", "bulkhead_full")

# queue gauges: (metric name, help, QueueView attribute)
QUEUE_GAUGES = (
    ("tidegate_queue_ready_messages", "Messages waiting to be delivered.", "ready"),
    ("tidegate_queue_in_flight_messages", "Messages delivered to a worker, not yet acked.",
     "in_flight"),
    ("tidegate_queue_delayed_messages", "Messages published but not deliverable yet.",
     "delayed"),
    ("tidegate_queue_oldest_message_age_seconds", "Age of the message waiting longest.",
     "oldest_age_s"),
    ("tidegate_queue_consumers", "Consumers attached to the queue (where the broker says).",
     "consumers"),
    ("tidegate_queue_backlog_messages", "Ready plus in flight: what the autoscaler sizes for.",
     "backlog"),
    ("tidegate_dead_letter_messages", "Messages in the queue's dead-letter queue.",
     "dead_letter"),
    ("tidegate_deferred_messages", "Requests queued for later (SQS) for this queue.",
     "deferred"),
    ("tidegate_desired_workers", "Workers this queue should run now (stabilised).",
     "desired_workers"),
    ("tidegate_target_backlog_per_worker_messages",
     "Backlog one worker may hold and meet the acceptable wait.", "target_per_worker"),
    ("tidegate_task_processing_seconds", "Mean recent task time (or the configured default).",
     "processing_s"),
    ("tidegate_queue_live_workers", "Worker processes with a live heartbeat consuming the queue.",
     "live_workers"),
    ("tidegate_queue_orphaned_messages", "Unacked messages held by workers whose heartbeat "
     "expired, until the orphan sweep restores them (Redis).", "orphaned"),
    ("tidegate_queue_held_retries_messages", "Of in flight, retries a worker holds until their "
     "countdown ends (Redis; not work in progress).", "held_retries"),
    ("tidegate_queue_capacity_tasks", "Tasks the live workers on the queue run at once (their "
     "pool sizes summed).", "capacity"),
)

CLUSTER_COUNTERS = (
    ("tidegate_cluster_sheds", "Requests shed under load, all processes.", ("priority",)),
    ("tidegate_cluster_worker_shed", "Jobs workers took from their queue and dead-lettered "
     "unrun (reason shed) because they were overloaded, all processes.", ("queue", "priority")),
    ("tidegate_cluster_rejections", "Calls refused before the dependency (rate limit, open "
     "circuit, full bulkhead), all processes.", ("dependency", "reason")),
    ("tidegate_cluster_retries", "Retry attempts started, all processes.", ("dependency",)),
    ("tidegate_cluster_dead_letters", "Tasks dead-lettered, all processes.", ("queue",)),
    ("tidegate_cluster_task_outcomes", "Tasks finished, by outcome as Celery events report "
     "them (succeeded: SUCCESS; dead_lettered, failed: FAILURE; deferred: DEFERRED), all "
     "processes.", ("queue", "outcome")),
    ("tidegate_cluster_producer_refused", "Enqueues refused by producers (backpressure = shed, "
     "rate_limited, broker_unavailable), all processes.", ("queue", "priority", "reason")),
    ("tidegate_cluster_orphans_restored", "Unacked messages of dead workers put back on their "
     "queue by the orphan sweep (Redis).", ("queue",)),
    ("tidegate_cluster_orphan_wait_seconds", "Sum over restored orphans of the seconds from their "
     "worker's last heartbeat to the restore (divide by orphans_restored: mean age).",
     ("queue",)),
)
PRODUCER_REASONS = ("backpressure", "rate_limited")


class DepthCollector(Collector):
    """Turns an observer's snapshot into metric families on every scrape."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def describe(self) -> Iterable:
        return []  # values are read on collect; do not probe at registration

    def collect(self) -> Iterator:
        started = time.perf_counter()
        snap = self.observer.snapshot()
        yield from queue_families(snap)
        yield from breaker_families(snap)
        yield from latency_families(snap)
        yield from concurrency_families(snap)
        yield from counter_families(snap, self.observer)
        meta = GaugeMetricFamily("tidegate_exporter_snapshot_age_seconds",
                                 "Age of the snapshot served (bounded by the cache TTL).")
        meta.add_metric([], max(0.0, time.time() - snap.taken_at))
        yield meta
        took = GaugeMetricFamily("tidegate_exporter_collect_seconds",
                                 "Time spent producing this scrape.")
        took.add_metric([], time.perf_counter() - started)
        yield took


def queue_families(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    up = GaugeMetricFamily("tidegate_queue_up", "1 if the queue's depth could be read.",
                           labels=["queue"])
    for q in snap.queues:
        up.add_metric([q.name], 0 if q.error else 1)
    yield up
    for name, doc, attr in QUEUE_GAUGES:
        family = GaugeMetricFamily(name, doc, labels=["queue"])
        for q in snap.queues:
            value = getattr(q, attr)
            if value is not None:  # unknown is absent, never a made-up zero
                family.add_metric([q.name], float(value))
        yield family


def breaker_families(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    state = GaugeMetricFamily("tidegate_breaker_state",
                              "Shared circuit breaker state: 0 closed, 1 half-open, 2 open.",
                              labels=["dependency", "queue"])
    retry = GaugeMetricFamily("tidegate_breaker_retry_after_seconds",
                              "Seconds until an open breaker lets a trial call through.",
                              labels=["dependency", "queue"])
    known = GaugeMetricFamily("tidegate_breaker_state_known",
                              "0 while the shared state store cannot be read.",
                              labels=["dependency", "queue"])
    for b in snap.breakers:
        labels = [b.dependency, b.queue]
        known.add_metric(labels, 0 if b.state == "unknown" else 1)
        if b.state in BREAKER_GAUGE:
            state.add_metric(labels, BREAKER_GAUGE[b.state])
            retry.add_metric(labels, b.retry_after_s)
    yield from (state, retry, known)


def latency_families(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    """Each dependency's observed P99 (largest over the workers' windows), the seed's
    suggested timeout (P99 x 2) and the configured one, side by side."""
    p99 = GaugeMetricFamily("tidegate_dependency_latency_p99_seconds",
                            "Observed P99 of attempt durations (workers' windows, largest).",
                            labels=["dependency"])
    suggested = GaugeMetricFamily("tidegate_dependency_suggested_timeout_seconds",
                                  "The seed's timeout rule: observed P99 x 2.",
                                  labels=["dependency"])
    configured = GaugeMetricFamily("tidegate_dependency_timeout_seconds",
                                   "The per-attempt timeout in the policy file.",
                                   labels=["dependency"])
    samples = GaugeMetricFamily("tidegate_dependency_latency_samples",
                                "Attempt durations the P99 is taken over.",
                                labels=["dependency"])
    for view in snap.latency:
        configured.add_metric([view.dependency], view.timeout_s)
        if view.p99_s is not None:
            p99.add_metric([view.dependency], view.p99_s)
            suggested.add_metric([view.dependency], view.suggested_timeout_s)
            samples.add_metric([view.dependency], view.samples)
    yield from (p99, suggested, configured, samples)


def concurrency_families(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    """Each adaptive limit over the worker processes: limit and in flight summed (what the
    dependency may receive and is receiving from all of them), the lowest baseline."""
    families = {
        "limit": GaugeMetricFamily(
            "tidegate_dependency_concurrency_limit",
            "Adaptive concurrency limit, summed over live worker processes.",
            labels=["dependency"]),
        "in_flight": GaugeMetricFamily(
            "tidegate_dependency_concurrency_in_flight",
            "Calls in flight under the adaptive limit, summed over live worker processes.",
            labels=["dependency"]),
        "waiting": GaugeMetricFamily(
            "tidegate_dependency_concurrency_waiting",
            "Callers waiting for an adaptive-limit slot, summed over live worker processes.",
            labels=["dependency"]),
        "baseline_s": GaugeMetricFamily(
            "tidegate_dependency_latency_baseline_seconds",
            "The adaptive limit's latency baseline (lowest over live worker processes).",
            labels=["dependency"]),
        "processes": GaugeMetricFamily(
            "tidegate_dependency_concurrency_processes",
            "Worker processes that published an adaptive limit lately.",
            labels=["dependency"]),
    }
    for view in snap.concurrency:
        for attr, family in families.items():
            value = getattr(view, attr)
            if value is not None and (attr == "processes" or view.limit is not None):
                family.add_metric([view.dependency], float(value))
    yield from families.values()


def counter_families(snap: Snapshot, observer: Observer) -> Iterator[CounterMetricFamily]:
    """Cluster totals, with a zero series for every known label set (no gaps in rate())."""
    deps = [d.name for d in observer.topology.dependencies]
    defaults: dict[str, list[dict[str, str]]] = {
        "tidegate_cluster_sheds": [{"priority": p.name.lower()} for p in Priority],
        "tidegate_cluster_worker_shed": [{"queue": q, "priority": p.name.lower()}
                                         for q in observer.topology.work_queues
                                         for p in Priority if p is not Priority.CRITICAL],
        "tidegate_cluster_rejections": [{"dependency": d, "reason": r} for d in deps
                                        for r in REJECTION_REASONS],
        "tidegate_cluster_retries": [{"dependency": d} for d in deps],
        "tidegate_cluster_dead_letters": [{"queue": q} for q in observer.topology.work_queues],
        "tidegate_cluster_orphans_restored": [{"queue": q} for q in observer.topology.work_queues],
        "tidegate_cluster_orphan_wait_seconds": [{"queue": q}
                                                 for q in observer.topology.work_queues],
        "tidegate_cluster_task_outcomes": [{"queue": q, "outcome": o} for q in
                                           observer.topology.work_queues for o in sorted(FINAL)],
        "tidegate_cluster_producer_refused": [
            {"queue": q, "priority": p.name.lower(), "reason": r}
            for q in observer.topology.work_queues for p in Priority for r in PRODUCER_REASONS],
    }
    for name, doc, labels in CLUSTER_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=list(labels))
        values: dict[tuple[str, ...], float] = {
            tuple(d.get(k, "") for k in labels): 0.0 for d in defaults[name]}
        for row_labels, value in snap.counters.get(name, []):
            values[tuple(row_labels.get(k, "") for k in labels)] = value
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        yield family


def build_registry(observer: Observer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DepthCollector(observer))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class Sampler:
    """Takes a snapshot every ``interval_s`` into the status page's history."""

    def __init__(self, observer: Observer, history, interval_s: float = 1.0) -> None:
        self.observer = observer
        self.history = history
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tidegate-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.history.add(self.observer.snapshot())
            except Exception:
                log.exception("snapshot failed")
            self._stop.wait(self.interval_s)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 5)


def serve(host: str, port: int, *, interval_s: float = 1.0, ttl_s: float = 1.0,
          history_s: float = 600.0) -> None:
    """Run the exporter and status page until interrupted."""
    import uvicorn

    from tidegate.status import History, create_app
    from workers.installation import installation, load_app

    installed = installation(load_app())  # --app/TIDEGATE_APP, else the example
    observer = Observer(installed.settings, installed.topology, ttl_s=ttl_s)
    history = History(max_age_s=history_s)
    sampler = Sampler(observer, history, interval_s).start()
    app = create_app(observer, history, build_registry(observer))
    log.info("tidegate exporter on http://%s:%d/metrics", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    timeout_keep_alive=5)
    finally:
        sampler.stop()
