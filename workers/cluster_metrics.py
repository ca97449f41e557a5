"""Counters summed over every worker and producer process, through Redis.

Sheds, rate-limit rejections, retries and dead-letters are counted in the process where they
happen (:mod:`resilience.metrics`, prometheus-client, in memory). The exporter is another
process and cannot read those. Each process therefore runs a :class:`CounterMirror`: every
``interval_s`` it reads its own counters and adds the *increase since its last flush* to one
Redis hash (``HINCRBYFLOAT``, atomic), so the hash holds cluster-wide totals that only grow.
The exporter reads the hash on scrape (:func:`read_cluster_counters`) and publishes them as
``_total`` counters; PromQL's ``rate()`` then works across worker restarts, because a
restarted process starts from zero locally but only ever adds to the shared total.

Loss bound: a process killed with SIGKILL loses at most ``interval_s`` of increments.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from workers.mirror import Ticker, in_every_worker_process

__all__ = ["HASH_KEY", "MIRRORED", "CounterMirror", "install", "read_cluster_counters"]

log = logging.getLogger(__name__)

HASH_KEY = "tidegate:cluster:counters"

MIRRORED: Mapping[str, str] = {
    # local sample name                   -> cluster metric family (without _total)
    "tidegate_sheds_total": "tidegate_cluster_sheds",
    "tidegate_worker_shed_total": "tidegate_cluster_worker_shed",
    "tidegate_rejections_total": "tidegate_cluster_rejections",
    "tidegate_retries_total": "tidegate_cluster_retries",
    "tidegate_dead_letters_total": "tidegate_cluster_dead_letters",
    "tidegate_task_outcomes_total": "tidegate_cluster_task_outcomes",
    "tidegate_producer_refused_total": "tidegate_cluster_producer_refused",
    "tidegate_orphans_restored_total": "tidegate_cluster_orphans_restored",
    "tidegate_orphan_wait_seconds_total": "tidegate_cluster_orphan_wait_seconds",
    # the status page's per-dependency throughput, outcomes, fallbacks and deferrals
    "tidegate_calls_total": "tidegate_cluster_calls",
    "tidegate_fallbacks_total": "tidegate_cluster_fallbacks",
    "tidegate_deferrals_total": "tidegate_cluster_deferrals",
}


def _field(family: str, labels: Mapping[str, str]) -> str:
    """Hash field: ``family|k=v|k=v`` (label values are Tidegate's own names: no ``|`` or ``=``)."""
    return "|".join([family, *(f"{k}={v}" for k, v in sorted(labels.items()))])


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    family, *pairs = field.split("|")
    return family, dict(p.split("=", 1) for p in pairs if "=" in p)


class CounterMirror:
    """Adds this process's counter increases to the shared Redis hash."""

    def __init__(
        self,
        client: Any,
        *,
        registry: CollectorRegistry = REGISTRY,
        names: Mapping[str, str] = MIRRORED,
        interval_s: float = 5.0,
        key: str = HASH_KEY,
    ) -> None:
        self.client = client
        self.registry = registry
        self.names = names
        self.interval_s = interval_s
        self.key = key
        self._flushed: dict[str, float] = {}
        self._lock = threading.Lock()
        # Redis away: keep counting locally, retry next tick
        self._ticker = Ticker(self.flush, interval_s, name="tidegate-counter-mirror",
                              failure="cluster counters not flushed", log=log)

    def _local(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                family = self.names.get(sample.name)
                if family is not None:
                    values[_field(family, sample.labels)] = sample.value
        return values

    def flush(self) -> int:
        """Push the increase since the last flush; returns how many fields moved."""
        with self._lock:
            current = self._local()
            deltas = {f: v - self._flushed.get(f, 0.0) for f, v in current.items()}
            deltas = {f: d for f, d in deltas.items() if d > 0}
            if not deltas:
                return 0
            pipe = self.client.pipeline(transaction=True)
            for f, d in deltas.items():
                pipe.hincrbyfloat(self.key, f, d)
            pipe.execute()  # raises: the deltas stay pending and go with the next flush
            self._flushed.update({f: current[f] for f in deltas})
            return len(deltas)

    def start(self) -> CounterMirror:
        self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop the thread and flush what is left (call at shutdown)."""
        self._ticker.stop(join_s=self.interval_s + 1)
        try:
            self.flush()
        except Exception as exc:
            log.warning("cluster counters: final flush failed: %s", exc)


def read_cluster_counters(
    client: Any, key: str = HASH_KEY
) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{family: [(labels, total), ...]}`` from the shared hash."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for raw_field, raw_value in client.hgetall(key).items():
        name = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
        family, labels = _parse_field(name)
        out.setdefault(family, []).append((labels, float(raw_value)))
    return out


def install(app: Any, client: Any, *, interval_s: float = 5.0) -> None:
    """Run a mirror in every Celery worker process (prefork children included).

    Connect once where the worker app is built; the mirror starts when the worker (or a
    prefork child) is ready and flushes on shutdown.
    """
    in_every_worker_process(lambda: CounterMirror(client, interval_s=interval_s).start())
