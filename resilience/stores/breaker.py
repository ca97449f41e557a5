"""Breaker state in a store: the CLOSED / OPEN / HALF_OPEN machine and its rolling window.

:class:`MemoryBreakerOps` is the reference semantics; :class:`RedisBreakerOps` runs the same
machine as one Lua script (``lua/breaker.lua``), so read-decide-write is atomic across
processes and costs one round trip. Both are mixed into the stores of :mod:`.memory` and
:mod:`.redis_store`; ``tests/integration/test_store_models.py`` checks both against one model.

Operations speak in *deltas* and *snapshots*: callers count locally and merge counts in
batches (see :mod:`resilience.breaker`), so the success path does not pay a round trip.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = [
    "BUCKETS_PER_WINDOW",
    "HALF_OPEN_BUSY_RETRY_AFTER",
    "BreakerParams",
    "BreakerSnapshot",
    "BreakerStore",
    "MemoryBreakerOps",
    "RedisBreakerOps",
]

BUCKETS_PER_WINDOW = 10
"""A rolling window is this many buckets (10 s window -> 1 s buckets)."""

HALF_OPEN_BUSY_RETRY_AFTER = 1.0
"""retry_after given while every half-open trial slot is taken."""

STATES = ("open", "closed", "half_open")


class BreakerParams(Protocol):
    """What a store needs of a breaker config (``resilience.breaker.BreakerConfig``)."""

    failure_rate: float
    window: float
    minimum_calls: int
    open_duration: float
    half_open_calls: int
    slow_call_duration: float | None
    slow_call_rate: float


class BreakerSnapshot(NamedTuple):
    """The shared view of one breaker: state name, generation, seconds until it may probe."""

    state: str  # "closed" | "open" | "half_open"
    generation: int
    retry_after: float


@runtime_checkable
class BreakerStore(Protocol):
    """Atomic breaker operations. Times come from the store's own clock."""

    def breaker_sync(
        self, name: str, cfg: BreakerParams, calls: int, failures: int, slow: int,
        earlier: int = 0, age: float = 0.0,
    ) -> BreakerSnapshot:
        """Merge counts into the rolling window (CLOSED only), trip if over threshold.

        ``earlier`` successes happened ``age`` seconds ago (a local batch): they go to the
        bucket of that time, or nowhere if it has left the window.
        """

    def breaker_acquire(self, name: str, cfg: BreakerParams) -> tuple[bool, BreakerSnapshot]:
        """Ask for a trial slot (OPEN past its duration becomes HALF_OPEN)."""

    def breaker_result(
        self, name: str, cfg: BreakerParams, generation: int, outcome: str
    ) -> BreakerSnapshot:
        """Report a trial call: "success", "failure" or "ignored" (frees the slot)."""

    def breaker_force(
        self, name: str, cfg: BreakerParams, state: str, duration: float
    ) -> BreakerSnapshot:
        """Operator override: put the breaker in ``state`` (OPEN for ``duration`` s)."""

    def breaker_read(self, name: str, cfg: BreakerParams) -> BreakerSnapshot: ...


# --------------------------------------------------------------------------- memory


class _Breaker:
    __slots__ = (
        "buckets",
        "gen",
        "idx",
        "probe_since",
        "probes",
        "state",
        "successes",
        "totals",
        "until",
    )

    def __init__(self) -> None:
        self.state = "closed"
        self.gen = 0
        self.until = 0.0
        self.probes = 0
        self.successes = 0
        self.probe_since = 0.0
        self.buckets: dict[int, list[int]] = {}
        self.idx: int | None = None  # newest bucket seen; the window is pruned when it moves
        self.totals = [0, 0, 0]  # calls, failures, slow over ``buckets``, kept incrementally

    def clear_window(self) -> None:
        self.buckets.clear()
        self.idx = None
        self.totals = [0, 0, 0]


def _over_threshold(cfg: BreakerParams, calls: int, failures: int, slow: int) -> bool:
    if calls < cfg.minimum_calls or calls == 0:
        return False
    if failures / calls >= cfg.failure_rate:
        return True
    return cfg.slow_call_duration is not None and slow / calls >= cfg.slow_call_rate


class MemoryBreakerOps:
    """Breakers in process memory, behind the store's lock (``self._lock``, ``self.clock``)."""

    _breakers: dict[str, _Breaker]

    def _b(self, name: str) -> _Breaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = _Breaker()
        return b

    def _snap(self, b: _Breaker, cfg: BreakerParams, now: float) -> BreakerSnapshot:
        if b.state == "open":
            return BreakerSnapshot("open", b.gen, max(0.0, b.until - now))
        if b.state == "half_open" and b.probes >= cfg.half_open_calls:
            # busy: come back in a second, or when the trials' lease runs out if sooner
            lease_left = max(0.0, b.probe_since + cfg.open_duration - now)
            return BreakerSnapshot("half_open", b.gen, min(HALF_OPEN_BUSY_RETRY_AFTER, lease_left))
        return BreakerSnapshot(b.state, b.gen, 0.0)

    @staticmethod
    def _open(b: _Breaker, now: float, duration: float) -> None:
        b.state, b.gen, b.until = "open", b.gen + 1, now + duration
        b.clear_window()

    @staticmethod
    def _half_open_if_due(b: _Breaker, now: float) -> None:
        if b.state == "open" and now >= b.until:
            b.state, b.gen, b.probes, b.successes, b.probe_since = "half_open", b.gen + 1, 0, 0, now

    def breaker_sync(self, name, cfg, calls, failures, slow, earlier=0, age=0.0):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            if b.state == "closed" and (calls or failures or slow or earlier):
                width = cfg.window / BUCKETS_PER_WINDOW
                idx = math.floor(now / width)
                oldest = idx - BUCKETS_PER_WINDOW + 1
                buckets, totals = b.buckets, b.totals
                if idx != b.idx:  # a new bucket: drop the ones that left the window
                    for k in [k for k in buckets if k < oldest]:
                        gone = buckets.pop(k)
                        totals[0] -= gone[0]
                        totals[1] -= gone[1]
                        totals[2] -= gone[2]
                    b.idx = idx
                adds = [(idx, calls, failures, slow)]
                if earlier:
                    then = math.floor((now - age) / width)
                    if then >= oldest:
                        adds.append((min(then, idx), earlier, 0, 0))
                for k, c, f, sl in adds:
                    bucket = buckets.get(k)
                    if bucket is None:
                        bucket = buckets[k] = [0, 0, 0]
                    bucket[0] += c
                    bucket[1] += f
                    bucket[2] += sl
                    totals[0] += c
                    totals[1] += f
                    totals[2] += sl
                if _over_threshold(cfg, totals[0], totals[1], totals[2]):
                    self._open(b, now, cfg.open_duration)
            return self._snap(b, cfg, now)

    def breaker_acquire(self, name, cfg):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            if b.state == "closed":
                return True, self._snap(b, cfg, now)
            if b.state == "half_open":
                if b.probes >= cfg.half_open_calls and now - b.probe_since >= cfg.open_duration:
                    # trial calls that never reported (their process died): lease expired
                    b.probes, b.successes, b.probe_since = 0, 0, now
                if b.probes < cfg.half_open_calls:
                    b.probes += 1
                    return True, BreakerSnapshot("half_open", b.gen, 0.0)
            return False, self._snap(b, cfg, now)

    def breaker_result(self, name, cfg, generation, outcome):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            if b.state == "half_open" and b.gen == generation:
                if outcome == "failure":
                    self._open(b, now, cfg.open_duration)
                elif outcome == "success":
                    b.successes += 1
                    if b.successes >= cfg.half_open_calls:
                        b.state, b.gen = "closed", b.gen + 1
                        b.clear_window()
                else:
                    b.probes = max(0, b.probes - 1)
            return self._snap(b, cfg, now)

    def breaker_force(self, name, cfg, state, duration):
        if state not in STATES:
            raise ConfigError(f"unknown breaker state {state!r}")
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            if state == "open":
                self._open(b, now, duration)
            elif state == "closed":
                b.state, b.gen = "closed", b.gen + 1
                b.clear_window()
            else:
                b.state, b.gen, b.probes, b.successes, b.probe_since = (
                    "half_open", b.gen + 1, 0, 0, now,
                )  # fmt: skip
            return self._snap(b, cfg, now)

    def breaker_read(self, name, cfg):
        with self._lock:
            now = self.clock.now()
            b = self._b(name)
            self._half_open_if_due(b, now)
            return self._snap(b, cfg, now)


# --------------------------------------------------------------------------- redis


class RedisBreakerOps:
    """Breakers in Redis: ``lua/breaker.lua``, one script call per operation.

    Needs the Redis store's plumbing: ``_run`` (degraded mode), ``key``, ``_now_arg``,
    ``_script`` and ``fallback`` (see :class:`~resilience.stores.redis_store.RedisStore`).
    """

    def _breaker_call(self, name: str, cfg: BreakerParams, op: str, *extra: Any) -> list:
        keys = [self.key("breaker", name, "state"), self.key("breaker", name, "window")]
        args = [
            self._now_arg(), op, cfg.failure_rate, cfg.window, cfg.minimum_calls,
            cfg.open_duration, cfg.half_open_calls,
            1 if cfg.slow_call_duration is not None else 0, cfg.slow_call_rate,
            BUCKETS_PER_WINDOW, HALF_OPEN_BUSY_RETRY_AFTER, *extra,
        ]  # fmt: skip
        return self._script("breaker")(keys=keys, args=args)

    @staticmethod
    def _breaker_snap(raw: list) -> BreakerSnapshot:
        state = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return BreakerSnapshot(state, int(raw[1]), float(raw[2]))

    def breaker_sync(self, name, cfg, calls, failures, slow, earlier=0, age=0.0):
        return self._run(
            "breaker_sync",
            lambda: self._breaker_snap(self._breaker_call(
                name, cfg, "sync", calls, failures, slow, earlier, repr(float(age)))),
            lambda: self.fallback.breaker_sync(name, cfg, calls, failures, slow, earlier, age),
        )

    def breaker_acquire(self, name, cfg):
        def remote():
            raw = self._breaker_call(name, cfg, "acquire")
            return bool(int(raw[0])), self._breaker_snap(raw[1:])

        return self._run(
            "breaker_acquire", remote, lambda: self.fallback.breaker_acquire(name, cfg)
        )

    def breaker_result(self, name, cfg, generation, outcome):
        return self._run(
            "breaker_result",
            lambda: self._breaker_snap(
                self._breaker_call(name, cfg, "result", generation, outcome)),
            lambda: self.fallback.breaker_result(name, cfg, generation, outcome),
        )

    def breaker_force(self, name, cfg, state, duration):
        if state not in STATES:
            raise ConfigError(f"unknown breaker state {state!r}")
        duration = min(duration, 10 * 365 * 86400.0)  # "forever" must stay a finite number
        return self._run(
            "breaker_force",
            lambda: self._breaker_snap(self._breaker_call(name, cfg, "force", state, duration)),
            lambda: self.fallback.breaker_force(name, cfg, state, duration),
        )

    def breaker_read(self, name, cfg):
        return self._run(
            "breaker_read",
            lambda: self._breaker_snap(self._breaker_call(name, cfg, "read")),
            lambda: self.fallback.breaker_read(name, cfg),
        )
