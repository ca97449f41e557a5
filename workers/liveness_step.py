"""The consumer bootstep that runs a worker's liveness threads (docs/delivery.md, worker loss).

Every broker: the heartbeat (:mod:`workers.liveness`). Redis with the reliable fetch: the
orphan sweep too (:mod:`workers.orphans`), on the heartbeat's thread with a connection of its
own. SQS: the visibility extension (:mod:`workers.visibility`) on a second thread. They start
before the consumer's first fetch and stop after the pool's last task (``worker_shutdown``):
a warm shutdown still finishing a long task keeps beating, and keeps its messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from celery import bootsteps, signals

from workers.brokers import broker_for
from workers.liveness import Heartbeat, Periodic, Registry, WorkerRecord, new_worker_id

__all__ = ["Liveness", "LivenessThreads"]

log = logging.getLogger(__name__)


class LivenessThreads:
    """What one worker process runs; built from its settings and its consumer."""

    def __init__(self, app: Any, consumer: Any, settings: Any) -> None:
        self.app, self.consumer, self.settings = app, consumer, settings
        queues = tuple(sorted(app.amqp.queues.consume_from or ()))
        now = time.time()
        node = getattr(consumer, "hostname", None) or "worker"
        self.record = WorkerRecord(new_worker_id(node), node, os.getpid(), queues, now, now,
                                   _pool_size(consumer, app))
        self.broker = broker_for(settings)
        self.sweeps = self.broker.sweeps_orphans(settings)
        self._conn: Any = None
        self._channel: Any = None
        self._state: Any = None
        self._threads: list[Periodic] = []
        self._heartbeat: Heartbeat | None = None
        self._sweeper: Any = None
        self._next_sweep = 0.0

    # -- clients, rebuilt after an error
    def _broker_channel(self) -> Any:
        if self._channel is None:
            self._conn = self.app.connection_for_write()
            self._channel = self._conn.channel()
        return self._channel

    def _drop_broker(self) -> None:
        conn, self._conn, self._channel, self._sweeper = self._conn, None, None, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                conn.release()

    def _registry(self) -> Registry:
        if self.broker.heartbeats_in_broker:  # the broker's Redis, through our kombu channel
            channel = self._broker_channel()
            return _ChannelRegistry(channel)
        if self._state is None:
            from resilience.stores import redis_client

            self._state = redis_client(self.settings.redis_url,
                                       socket_timeout=self.settings.read_timeout_s,
                                       socket_connect_timeout=self.settings.connect_timeout_s)
        return Registry(self._state)

    # -- the liveness thread: beat, and sweep when due
    def tick(self) -> None:
        try:
            registry = self._registry()
            assert self._heartbeat is not None
            self._heartbeat.registry = registry
            self._heartbeat.beat()
            if self.sweeps and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.settings.orphan_sweep_s
                self._sweep()
        except Exception:
            self._drop_broker()
            raise

    def _sweep(self) -> None:
        if self._sweeper is None:
            from workers.orphans import Sweeper

            self._sweeper = Sweeper(self._broker_channel(), owner=self.record.id,
                                    interval_s=self.settings.orphan_sweep_s,
                                    grace_s=self.settings.worker_heartbeat_ttl_s)
        self._sweeper.sweep()

    def start(self) -> LivenessThreads:
        s = self.settings
        self._heartbeat = Heartbeat(Registry(None), self.record, interval_s=s.worker_heartbeat_s,
                                    ttl_s=s.worker_heartbeat_ttl_s)
        self._heartbeat.start_holding()
        tick = min(s.worker_heartbeat_s, s.orphan_sweep_s) if self.sweeps else s.worker_heartbeat_s
        self._threads.append(Periodic("tidegate-liveness", tick, self.tick).start())
        for name, interval_s, work in self.broker.worker_threads(s, self.consumer):
            self._threads.append(Periodic(name, interval_s, work).start())
        log.info("liveness: worker %s beats every %.1f s (TTL %.1f s)%s", self.record.id,
                 s.worker_heartbeat_s, s.worker_heartbeat_ttl_s,
                 f"; orphan sweep every {s.orphan_sweep_s:.1f} s" if self.sweeps else "")
        return self

    def stop(self) -> None:
        for thread in self._threads:
            thread.stop()
        if self._heartbeat is not None:
            try:
                self._heartbeat.registry = self._registry()
            except Exception as exc:
                log.warning("heartbeat not removed at shutdown: %s", exc)
            else:
                self._heartbeat.stop()
        self._drop_broker()


def _pool_size(consumer: Any, app: Any) -> int | None:
    """How many tasks this worker runs at once (``-c``): its capacity on the status page."""
    for value in (getattr(getattr(consumer, "controller", None), "concurrency", None),
                  getattr(getattr(consumer, "pool", None), "limit", None),
                  app.conf.worker_concurrency):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class _ChannelRegistry(Registry):
    """The registry in the broker's Redis, through our kombu channel's shared client."""

    def __init__(self, channel: Any) -> None:
        with channel.conn_or_acquire() as client:
            super().__init__(client, channel.global_keyprefix)


class Liveness(bootsteps.StartStopStep):
    """Starts :class:`LivenessThreads` once per worker process; stops them at worker shutdown."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.threads: LivenessThreads | None = None

    def start(self, parent: Any) -> None:
        from workers.installation import NotInstalled, installation

        if self.threads is not None:
            return  # a consumer restart after a lost connection: already running
        try:
            settings = installation(parent.app).settings
        except NotInstalled:
            return
        if not broker_for(settings).runs_liveness:
            return
        self.threads = LivenessThreads(parent.app, parent, settings).start()
        signals.worker_shutdown.connect(self._on_worker_shutdown, weak=False)

    def _on_worker_shutdown(self, **_: Any) -> None:
        threads, self.threads = self.threads, None
        if threads is not None:
            threads.stop()
