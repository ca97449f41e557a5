"""When, and how fast, the replayer may publish (``workers.replayer``).

Its limits (:class:`ReplayConfig`), the slow start of its publish rate (:class:`SlowStart`),
whether the dependency is back (:class:`Gate`: the shared breaker, confirmed by the health
endpoint), the work queue's ready depth against the watermark (:func:`depth_reader`), and when
the next retention sweep is due, shared by every replayer of a dependency
(:class:`SweepSchedule`). The replay loop itself, which asks these, is in ``workers.replayer``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from resilience.errors import ConfigError
from resilience.policy import PolicyConfig
from resilience.stores import StateStore
from workers.brokers import broker_for
from workers.settings import Settings
from workers.sqs_deferral import SQS_MAX_BATCH
from workers.topology import Dependency

__all__ = ["DepthReader", "Gate", "ReplayConfig", "SlowStart", "SweepSchedule",
           "depth_reader"]

log = logging.getLogger("workers.replayer")  # the replayer's log lines, wherever written


@dataclass(frozen=True)
class ReplayConfig:
    """How fast and how far a replayer may go."""

    max_queue_depth: int = 500  # watermark on the work queue's ready messages
    visibility_timeout_s: int = 60  # how long a received entry stays hidden from others
    start_rate: float = 10.0  # entries/s when draining starts (slow start)
    max_rate: float | None = None  # None: as fast as SQS and the watermark allow
    ramp_factor: float = 2.0
    ramp_interval_s: float = 1.0
    probe_interval_s: float = 5.0  # health probe period while draining
    down_wait_s: float = 2.0  # between checks while the dependency is down
    depth_wait_s: float = 0.25  # between checks while the work queue is at its watermark
    idle_wait_s: int = 2  # SQS long poll while the deferral queue is empty
    max_backoff_s: float = 30.0  # after broker/SQS errors
    # While nothing is replayed, every entry is stored again this often so that SQS retention
    # cannot drop it (None: retention minus the near-retention margin, or half the retention)
    refresh_every_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_queue_depth < 1:
            raise ConfigError("replayer max_queue_depth must be >= 1")
        if self.start_rate <= 0 or (self.max_rate is not None and self.max_rate < self.start_rate):
            raise ConfigError("replayer rates must be > 0 and max_rate >= start_rate")
        if self.ramp_factor < 1 or self.ramp_interval_s <= 0:
            raise ConfigError("replayer ramp_factor must be >= 1 and ramp_interval_s > 0")
        if not 0 <= self.idle_wait_s <= 20:
            raise ConfigError("replayer idle_wait_s must be 0-20 (the SQS long-poll limit)")
        if self.refresh_every_s is not None and self.refresh_every_s <= 0:
            raise ConfigError("replayer refresh_every_s must be > 0")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ReplayConfig:
        base = {"max_queue_depth": settings.replay_max_queue_depth,
                "visibility_timeout_s": settings.replay_visibility_timeout_s}
        return cls(**{**base, **overrides})


class SlowStart:
    """A token bucket whose rate grows geometrically while draining goes well."""

    def __init__(self, cfg: ReplayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.began = self.clock()
        self.last = self.began
        self.tokens = 1.0

    @property
    def rate(self) -> float:
        steps = (self.clock() - self.began) / self.cfg.ramp_interval_s
        rate = self.cfg.start_rate * self.cfg.ramp_factor ** min(steps, 64)
        return rate if self.cfg.max_rate is None else min(rate, self.cfg.max_rate)

    def take(self, wanted: int) -> tuple[int, float]:
        """(how many may go now, seconds to wait if none may)."""
        now = self.clock()
        rate = self.rate
        self.tokens = min(float(SQS_MAX_BATCH), self.tokens + (now - self.last) * rate)
        self.last = now
        granted = min(wanted, int(self.tokens))
        if granted <= 0:
            return 0, (1.0 - self.tokens) / rate
        self.tokens -= granted
        return granted, 0.0


class DepthReader(Protocol):
    def ready(self, queue: str) -> int: ...


class _ProbeDepth:
    """Ready depth through ``workers.depth`` (the shared probe)."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe

    def ready(self, queue: str) -> int:
        return int(self.probe.depth(queue).ready)


def depth_reader(settings: Settings) -> DepthReader:
    """The ready depth from the broker's depth probe (its adapter's)."""
    return _ProbeDepth(broker_for(settings).depth_probe(settings))


class Gate:
    """Is the dependency back? Its shared breaker, confirmed by its health endpoint."""

    def __init__(self, dependency: Dependency, store: StateStore, settings: Settings,
                 probe_interval_s: float, http: httpx.Client | None = None) -> None:
        self.dependency = dependency
        self.store = store
        self.breaker_cfg = PolicyConfig.from_mapping(dependency.name, dependency.policy).breaker
        self.probe_interval_s = probe_interval_s
        self.http = http or httpx.Client(timeout=httpx.Timeout(
            settings.read_timeout_s, connect=settings.connect_timeout_s))
        self._healthy_until = 0.0

    def breaker(self) -> str:
        return self.store.breaker_read(self.dependency.name, self.breaker_cfg).state

    def healthy(self) -> bool:
        now = time.monotonic()
        if now < self._healthy_until:
            return True
        try:
            ok = self.http.get(f"{self.dependency.url.rstrip('/')}/health").status_code < 300
        except httpx.HTTPError:
            ok = False
        self._healthy_until = now + self.probe_interval_s if ok else 0.0
        return ok

    def forget(self) -> None:
        self._healthy_until = 0.0

    def state(self) -> str:
        """"down", "trial" (half-open: one at a time) or "up"."""
        breaker = self.breaker()
        if breaker == "open":
            return "down"
        if not self.healthy():
            return "down"
        return "trial" if breaker == "half_open" else "up"


# KEYS[1] next-sweep time. ARGV: 1 now, 2 period (epoch seconds). 1 if a sweep is due and
# this caller takes it (the next one is then a period away); a key not seen before starts
# the clock instead.
_CLAIM_SWEEP = """
local due = redis.call('GET', KEYS[1])
local now, every = tonumber(ARGV[1]), tonumber(ARGV[2])
if due and now < tonumber(due) then return 0 end
redis.call('SET', KEYS[1], tostring(now + every))
if due then return 1 end
return 0
"""


class SweepSchedule:
    """When a dependency's next retention sweep is due, shared by all its replayers.

    Kept in Redis (``tidegate:deferral:<dependency>:next_sweep``) so a restarted replayer
    does not start the period over (a crash-looping one would otherwise never sweep), and
    so that of several replayers one sweeps. A dependency seen for the first time is due
    one period later. Without Redis (or when it is away) an in-process clock stands in.
    """

    def __init__(self, dependency: str, client: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = f"tidegate:deferral:{dependency}:next_sweep"
        self.clock = clock
        self._claim = client.register_script(_CLAIM_SWEEP) if client is not None else None
        self._client = client
        self._local_due: float | None = None

    def claim(self, every: float) -> bool:
        """True when a sweep is due and the caller should run it now."""
        now = self.clock()
        if self._claim is not None:
            try:
                return bool(self._claim(keys=[self.key], args=[repr(now), repr(every)]))
            except Exception as exc:  # Redis away: the local clock decides meanwhile
                log.warning("sweep schedule in Redis unavailable: %s", exc)
        if self._local_due is None:
            self._local_due = now + every
        if now < self._local_due:
            return False
        self._local_due = now + every
        return True

    def retry_in(self, seconds: float) -> None:
        """A sweep failed: be due again soon rather than a whole period later."""
        due = self.clock() + seconds
        self._local_due = due
        if self._client is not None:
            try:
                self._client.set(self.key, repr(due))
            except Exception as exc:
                log.warning("sweep schedule in Redis unavailable: %s", exc)
