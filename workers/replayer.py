"""The replayer: drains a dependency's deferred requests back onto its Celery queue.

It watches the dependency (the shared breaker state in Redis, and ``GET <url>/health``) and,
once it is back, receives deferred entries from SQS in batches of up to 10, publishes each
to its work queue with its ORIGINAL idempotency key (broker confirms on RabbitMQ; Redis
answers the LPUSH), and deletes an entry from SQS only after its publish was confirmed.

* Slow start: the publish rate starts at ``start_rate`` and doubles every ``ramp_interval_s``;
  it falls back to the start whenever the dependency goes down again.
* Half-open breaker: one entry at a time, as the trial call; the flood waits for CLOSED.
* It stops publishing as soon as the breaker is seen OPEN (checked before every batch) or the
  health probe fails, and never lets the work queue's ready depth pass ``max_queue_depth``.
* Exactly once: SQS may hand an entry out twice (visibility timeout, a failed delete, two
  replayers); the duplicate carries the same idempotency key (and a task id derived from it),
  so the worker's idempotency store and the dependency apply it once.
* Poison (undecodable entry, unknown task, wrong dependency) is neither published nor
  deleted: SQS redelivers it and its redrive policy moves it to the DLQ after maxReceiveCount.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resilience import metrics
from resilience.errors import ConfigError, DeferralError, TransientError
from resilience.shedding import Priority
from resilience.stores import RedisStore, StateStore, redis_client
from workers import headers as h
from workers.brokers import broker_for
from workers.deferral import store_for
from workers.idempotency import ttl_from_env
from workers.installation import installation
from workers.jobs import JobStatuses
from workers.replay_pacing import (
    DepthReader,
    Gate,
    ReplayConfig,
    SlowStart,
    SweepSchedule,
    depth_reader,
)
from workers.settings import Settings
from workers.sqs_deferral import SQS_MAX_BATCH, DeferredEntry, SqsDeferralStore
from workers.topology import Dependency, Topology

__all__ = [
    "DEFERRALS_HEADER",
    "FIRST_DEFERRED_HEADER",
    "DependencyDown",
    "Gate",
    "ReplayConfig",
    "ReplayStats",
    "Replayer",
    "SweepSchedule",
    "build_replayer",
    "replay_task_id",
]

log = logging.getLogger(__name__)

DEFERRALS_HEADER = h.DEFERRALS  # how often this request was deferred so far
FIRST_DEFERRED_HEADER = h.FIRST_DEFERRED_AT  # epoch seconds of the first deferral
_TASK_ID_NS = uuid.UUID("5f0c2a56-6b0e-4d8e-9a43-1f3d1f6c9b21")

REPLAYED = metrics.get_or_create(
    metrics.Counter,
    "tidegate_replayed_total",
    "Deferred entries handled by the replayer, by result (published, deleted, poison, "
    "publish_failed, delete_failed).",
    ("dependency", "result"),
)
REPLAY_GATE = metrics.get_or_create(
    metrics.Gauge,
    "tidegate_replayer_gate",
    "What the replayer sees of its dependency: 0 down, 1 trial (half-open), 2 up.",
    ("dependency",),
)
REPLAY_RATE = metrics.get_or_create(
    metrics.Gauge,
    "tidegate_replayer_rate",
    "The replayer's current slow-start publish rate limit (entries per second).",
    ("dependency",),
)


class DependencyDown(TransientError):
    """The dependency is not back (breaker open or health probe failing): nothing replayed."""


def replay_task_id(idempotency_key: str) -> str:
    """The Celery task id of a replay: the same for every replay of one key."""
    return str(uuid.uuid5(_TASK_ID_NS, idempotency_key))


@dataclass
class ReplayStats:
    received: int = 0
    published: int = 0
    deleted: int = 0
    poison: int = 0
    publish_failed: int = 0
    delete_failed: int = 0
    batches: int = 0
    refreshed: int = 0  # stored again so that SQS retention cannot drop them
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "started"}
        d["seconds"] = round(time.monotonic() - self.started, 3)
        return d


class Replayer:
    """Replays one dependency's deferred entries. One thread per instance."""

    def __init__(self, app: Any, dependency: Dependency, store: SqsDeferralStore, gate: Gate,
                 depth: DepthReader, config: ReplayConfig | None = None,
                 schedule: SweepSchedule | None = None, jobs: JobStatuses | None = None) -> None:
        self.app = app
        self.jobs = jobs  # job states (workers.jobs): the deferred job points at its replay
        self.dependency = dependency
        self.name = dependency.name
        self.store = store
        self.gate = gate
        self.depth = depth
        self.cfg = config or ReplayConfig()
        installed = installation(app)
        self.topology: Topology = installed.topology
        self.broker = broker_for(installed.settings)
        self.ramp = SlowStart(self.cfg)
        self.stats = ReplayStats()
        self._backoff = 0.0
        self.schedule = schedule or SweepSchedule(dependency.name)
        app.loader.import_default_modules()

    # -- one batch
    def _room(self) -> int:
        queue = self.dependency.queue
        try:
            ready = self.depth.ready(queue)
        except Exception as exc:  # an unknown depth is not room
            log.warning("replayer %s: depth of %s unknown: %s", self.name, queue, exc)
            return 0
        return max(0, self.cfg.max_queue_depth - ready)

    def _poison(self, entry: DeferredEntry) -> str | None:
        r = entry.request
        if r is None:
            return entry.error or "undecodable"
        if r.dependency != self.name:
            return f"entry for dependency {r.dependency!r}"
        if r.task not in self.app.tasks:
            return f"unknown task {r.task!r}"
        try:
            Priority.parse(r.priority)
        except ConfigError as exc:
            return str(exc)
        return None

    def _publish(self, entry: DeferredEntry) -> None:
        r = entry.request
        assert r is not None and r.idempotency_key
        prio = Priority.parse(r.priority)
        self.app.send_task(
            r.task, args=list(r.args), kwargs=dict(r.kwargs),
            task_id=replay_task_id(r.idempotency_key),
            queue=self.topology.queue_for_task(r.task),
            priority=self.broker.priority(prio),
            headers={h.IDEMPOTENCY_KEY: r.idempotency_key, h.PRIORITY: prio.name,
                     h.ENQUEUED_AT: time.time(), DEFERRALS_HEADER: r.deferrals,
                     FIRST_DEFERRED_HEADER: r.first_deferred_at},
            retry=False,
        )
        self._record_replay(entry, replay_task_id(r.idempotency_key))

    def _record_replay(self, entry: DeferredEntry, replay_id: str) -> None:
        """The deferred job (the producer's id is the SQS message id; a worker's deferral
        names its task id) now points at its replay; the replay starts out queued."""
        if self.jobs is None:
            return
        r = entry.request
        assert r is not None
        self.jobs.write(replay_id, "queued", only_if="NX", task=r.task,
                        queue=self.topology.queue_for_task(r.task),
                        replayed_from=entry.message_id)
        try:
            deferred = self.jobs.read(entry.message_id, follow=False) or {}
        except Exception as exc:  # a status is best effort: the replay itself is done
            log.warning("replayer %s: job status of %s unreadable: %s", self.name,
                        entry.message_id, exc)
            return
        for job_id in {entry.message_id, deferred.get("job")} - {None, replay_id}:
            self.jobs.write(job_id, "replayed", only_if="XX", wait=True, task=r.task,
                            queue=self.topology.queue_for_task(r.task), replay_id=replay_id,
                            deferred_id=entry.message_id)

    def replay(self, entries: list[DeferredEntry]) -> int:
        """Publish, then delete what was published. Returns how many were published."""
        done: list[DeferredEntry] = []
        for entry in entries:
            reason = self._poison(entry)
            if reason is not None:
                self.stats.poison += 1
                REPLAYED.labels(dependency=self.name, result="poison").inc()
                log.error("replayer %s: poison entry %s (receive %d): %s; left for the DLQ",
                          self.name, entry.message_id, entry.receive_count, reason)
                continue
            try:
                self._publish(entry)
            except Exception as exc:  # broker down, nack, timeout: not published
                self.stats.publish_failed += 1
                REPLAYED.labels(dependency=self.name, result="publish_failed").inc()
                log.warning("replayer %s: publish failed, %d entries wait for their visibility "
                            "timeout: %s", self.name, len(entries) - len(done), exc)
                self._backoff = min(self.cfg.max_backoff_s, max(1.0, self._backoff * 2))
                break
            done.append(entry)
        self.stats.published += len(done)
        REPLAYED.labels(dependency=self.name, result="published").inc(len(done))
        if done:
            failed = self.store.delete(done)
            self.stats.deleted += len(done) - len(failed)
            self.stats.delete_failed += len(failed)
            REPLAYED.labels(dependency=self.name, result="deleted").inc(len(done) - len(failed))
            if failed:  # they come back after the timeout; the key makes the replay harmless
                REPLAYED.labels(dependency=self.name, result="delete_failed").inc(len(failed))
        return len(done)

    def step(self, *, long_poll: bool = True) -> tuple[str, float]:
        """One decision and at most one batch: (what happened, seconds to wait before next)."""
        gate = self.gate.state()
        REPLAY_GATE.labels(dependency=self.name).set({"down": 0, "trial": 1, "up": 2}[gate])
        if gate == "down":
            self.ramp.reset()
            self.gate.forget()
            self._sweep_if_due()
            return "down", self.cfg.down_wait_s
        room = self._room()
        if room <= 0:
            self._sweep_if_due()
            return "full", self.cfg.depth_wait_s
        wanted = 1 if gate == "trial" else min(SQS_MAX_BATCH, room)
        granted, wait = self.ramp.take(wanted)
        REPLAY_RATE.labels(dependency=self.name).set(self.ramp.rate)
        if granted == 0:
            return "paced", wait
        try:
            entries = self.store.receive(
                granted, visibility_timeout=self.cfg.visibility_timeout_s,
                wait_s=self.cfg.idle_wait_s if long_poll else 0)
        except DeferralError as exc:
            self._backoff = min(self.cfg.max_backoff_s, max(1.0, self._backoff * 2))
            log.warning("replayer %s: %s", self.name, exc)
            return "error", self._backoff
        self.ramp.tokens += granted - len(entries)  # unused grants are not spent
        if not entries:
            return "empty", 0.0
        self.stats.batches += 1
        self.stats.received += len(entries)
        self.store.observe_ages(entries)
        self._backoff = 0.0
        self.replay(entries)
        if self._backoff:
            return "error", self._backoff
        return ("trial", self.cfg.down_wait_s) if gate == "trial" else ("replayed", 0.0)

    # -- retention
    def refresh_every_s(self) -> float:
        """How often entries are stored again while nothing is replayed."""
        if self.cfg.refresh_every_s is not None:
            return self.cfg.refresh_every_s
        retention, margin = self.store.retention_s, self.store.spec.near_retention_s
        return float(retention - margin if 0 < margin < retention else retention / 2)

    def _sweep_if_due(self) -> None:
        try:
            every = self.refresh_every_s()  # reads the queue's retention: may fail too
            if not self.schedule.claim(every):
                return
            refreshed = self.sweep(every)
        except DeferralError as exc:  # SQS away: try again within a minute
            log.warning("replayer %s: refreshing deferred entries failed: %s", self.name, exc)
            self.schedule.retry_in(60.0)
            return
        if refreshed:
            log.info("replayer %s: %d deferred entries stored again; next time in %.0f s",
                     self.name, refreshed, every)

    def sweep(self, every: float) -> int:
        """Store every entry of the deferral queue again (:meth:`SqsDeferralStore.refresh`).

        Runs while the dependency is down (or the work queue full), once per ``every``
        seconds: an entry is then never older than that, so SQS retention cannot drop it
        however long the outage lasts. Every entry is copied, not only old ones: an entry
        received and put back would spend a receive toward the DLQ each time, while a copy
        starts with none. Entries are told apart by idempotency key, so the sweep's own
        copies (visible at once) are not copied again; those it receives are put back when
        it ends, so the replay can start at once.
        """
        started = time.monotonic()
        hold = int(max(10, min(300, every / 2)))  # hidden while the sweep goes on
        seen: set[str] = set()  # idempotency keys; message ids for poison entries

        def ident(e: DeferredEntry) -> str:
            return e.request.idempotency_key if e.request is not None else e.message_id

        refreshed = 0
        held: list[DeferredEntry] = []
        try:
            # bounded: what was received first must not reappear while the sweep goes on
            while time.monotonic() - started < hold / 2:
                batch = self.store.receive(SQS_MAX_BATCH, visibility_timeout=hold)
                # Our own copies and poison come back here: they stay hidden until the sweep
                # is over (put back now, they would spend receives, toward the DLQ).
                fresh = [e for e in batch if ident(e) not in seen]
                held.extend(e for e in batch if ident(e) in seen)
                if not fresh:
                    break
                seen.update(ident(e) for e in fresh)
                self.store.observe_ages(fresh)
                refreshed += len(self.store.refresh(fresh))
        finally:
            self.store.release(held)  # replayable at once when the dependency is back
            self.stats.refreshed += refreshed
        return refreshed

    # -- loops
    def run(self, stop: threading.Event) -> ReplayStats:
        """Replay until ``stop`` is set (the ``tidegate replayer`` loop)."""
        log.info("replayer %s: watching %s (queue %s, watermark %d)", self.name,
                 self.dependency.url, self.dependency.queue, self.cfg.max_queue_depth)
        last = None
        while not stop.is_set():
            what, wait = self.step()
            if what != last and what in ("down", "trial", "replayed", "empty"):
                log.info("replayer %s: %s", self.name, what)
                last = what
            if wait > 0:
                stop.wait(wait)
        return self.stats

    def drain(self, stop: threading.Event | None = None,
              progress: Callable[[ReplayStats], None] | None = None,
              empty_checks: int = 2) -> ReplayStats:
        """Replay until the deferral queue is empty (``tidegate deferred replay``).

        Raises :class:`DependencyDown` if the dependency is not back (at start or midway).
        """
        stop = stop or threading.Event()
        empties = 0
        while not stop.is_set():
            what, wait = self.step(long_poll=empties > 0)
            if what == "down":
                raise DependencyDown(
                    f"{self.name} is not back (breaker open or {self.dependency.url}/health "
                    f"failing); {self.stats.published} replayed so far")
            if progress is not None:
                progress(self.stats)
            if what == "empty":
                empties += 1
                stats = self.store.stats()
                # in-flight entries are another replayer's, or poison on its way to the DLQ
                if empties >= empty_checks and stats.visible + stats.delayed == 0:
                    break
            else:
                empties = 0
            if wait > 0:
                stop.wait(wait)
        return self.stats


def build_replayer(app: Any, dependency: str, config: ReplayConfig | None = None,
                   *, state_store: StateStore | None = None,
                   depth: DepthReader | None = None) -> Replayer:
    """A replayer for ``dependency`` wired from the app's settings and topology."""
    installed = installation(app)
    settings: Settings = installed.settings
    topology: Topology = installed.topology
    dep = topology.dependency(dependency)
    cfg = config or ReplayConfig.from_settings(settings)
    if state_store is None:
        state_store = RedisStore(redis_client(settings.redis_url, socket_timeout=0.5,
                                              socket_connect_timeout=0.5))
    gate = Gate(dep, state_store, settings, cfg.probe_interval_s)
    schedule = SweepSchedule(dependency, getattr(state_store, "client", None))
    client = getattr(state_store, "client", None)
    jobs = JobStatuses(client, ttl_from_env()) if client is not None else None
    return Replayer(app, dep, store_for(dependency, settings, topology), gate,
                    depth or depth_reader(settings), cfg, schedule, jobs)
