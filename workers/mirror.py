"""What every per-process mirror into Redis shares (:mod:`workers.cluster_metrics`'
counters, :mod:`workers.latency_share`'s latency windows): a daemon thread that flushes
every ``interval_s``, and one mirror per Celery worker process, prefork children included
(each process holds its own state; only it can publish it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class Ticker:
    """Calls ``flush`` every ``interval_s`` on a daemon thread until stopped. A failed flush
    is logged as ``"<failure>: <error>"`` and tried again at the next tick (Redis away)."""

    def __init__(self, flush: Callable[[], object], interval_s: float, *, name: str,
                 failure: str, log: logging.Logger) -> None:
        self.flush, self.interval_s = flush, interval_s
        self.name, self.failure, self.log = name, failure, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:
                self.log.warning("%s: %s", self.failure, exc)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, join_s: float | None = None) -> None:
        """Stop ticking; with ``join_s``, wait up to that long for a flush under way."""
        self._stop.set()
        if join_s is not None and self._thread is not None:
            self._thread.join(join_s)


def in_every_worker_process(start: Callable[[], _Stoppable]) -> None:
    """Run ``start()``'s mirror in every Celery worker process (it starts when the worker, or
    a prefork child, is ready) and stop it at shutdown. Connect once where the app is built."""
    from celery import signals

    mirrors: list[_Stoppable] = []

    def begin(**_: Any) -> None:
        mirrors.append(start())

    def end(**_: Any) -> None:
        for mirror in mirrors:
            mirror.stop()

    signals.worker_process_init.connect(begin, weak=False)
    signals.worker_ready.connect(begin, weak=False)
    signals.worker_process_shutdown.connect(end, weak=False)
    signals.worker_shutdown.connect(end, weak=False)
