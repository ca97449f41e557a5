"""Fail fast while the broker is known down: a short circuit on the publish path.

Without it every enqueue during a broker outage paid the whole connect timeout again (2 s on
Redis: kombu's pool reconnects and waits), although the connection was refused at once, so a
producer got 3-4 answers in a 5 s outage. Once a publish fails for want of a connection, the
gate is *down*: each publish is refused at once with ``BrokerUnavailable``, while one daemon
thread probes the broker (a fresh connection, bounded by the connect timeout) right away and
then every ``interval_s``; the first probe that connects opens the gate again. A publish
refused by a broker that is up (unroutable, a channel error) does not close it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BrokerGate:
    """Down/up state of one broker, shared by the threads of one producer. Thread-safe."""

    def __init__(self, probe: Callable[[], None], interval_s: float = 0.25) -> None:
        self._probe = probe  # raises unless a connection to the broker can be made
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._reason = ""

    def down_for(self) -> tuple[float, str] | None:
        """``(seconds, why)`` while the broker is known down, else None. No I/O."""
        since = self._down_since
        return None if since is None else (time.monotonic() - since, self._reason)

    def trip(self, exc: BaseException) -> None:
        """A publish could not reach the broker: refuse the next ones until a probe connects."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since, self._reason = time.monotonic(), f"{type(exc).__name__}: {exc}"
        log.warning("broker unreachable (%s); refusing publishes until a probe connects",
                    self._reason)
        threading.Thread(target=self._reprobe, daemon=True, name="tidegate-broker-probe").start()

    def _reprobe(self) -> None:
        while True:
            try:
                self._probe()
            except Exception as exc:  # still down: try again after the interval
                self._reason = f"{type(exc).__name__}: {exc}"
                time.sleep(self._interval_s)
                continue
            with self._lock:
                down = time.monotonic() - (self._down_since or time.monotonic())
                self._down_since = None
            log.warning("broker reachable again after %.1fs; publishing", down)
            return
