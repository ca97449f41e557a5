"""One model per stored pattern, run against both stores: the memory store and real Redis.

Each model states its pattern as plainly as possible (the breaker's state machine and rolling
window, GCRA's theoretical arrival time, the retry budget's window); a hypothesis state
machine drives the model and a store side by side on one driven clock and compares every
answer. The Redis store runs the Lua scripts in ``resilience/stores/lua/``; its degraded
mode (answering from memory) would hide them, so every run also checks it never kicked in.

Times are multiples of 1/8 s from 1e6 and rates are powers of two, so every float is exact
and the 6-decimal rounding of the Lua side cannot flip a decision at a boundary.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from resilience.clock import FakeClock
from resilience.stores import MemoryStore, RedisStore

pytestmark = pytest.mark.integration

START = 1_000_000.0
NB = 10  # buckets per window
EXAMPLES = settings(max_examples=150, stateful_step_count=50, deadline=None)
ticks = st.integers(0, 160).map(lambda n: n / 8)  # 0 .. 20 s in exact steps


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """A factory of fresh stores on a given clock; the Redis ones use the slot's state db."""
    if request.param == "memory":
        yield MemoryStore
        return
    client = request.getfixturevalue("state_redis")
    made: list[RedisStore] = []

    def make(clock):
        store = RedisStore(client, prefix=f"model-{uuid.uuid4().hex[:8]}", clock=clock)
        made.append(store)
        return store

    yield make
    assert not any(s.degraded for s in made), "Redis store fell back to memory: Lua not tested"


def persist(store, *key: str) -> None:
    """Drop a Redis key's expiry. Expiries run on real time while these tests drive time by
    hand (a slow example could outlive a key the model still holds); the model has none."""
    if isinstance(store, RedisStore):
        store.client.persist(store.key(*key))


def snap_eq(got, want) -> bool:
    return (got.state, got.generation) == want[:2] and math.isclose(
        got.retry_after, want[2], abs_tol=1e-5)


# --------------------------------------------------------------------------- breaker


@dataclass(frozen=True)
class Params:
    failure_rate: float
    window: float
    minimum_calls: int
    open_duration: float
    half_open_calls: int
    slow_call_duration: float | None
    slow_call_rate: float


class BreakerModel:
    """The breaker as a store must keep it, counted call by call."""

    def __init__(self, cfg: Params) -> None:
        self.cfg = cfg
        self.state, self.gen, self.until = "closed", 0, 0.0
        self.probes, self.successes, self.since = 0, 0, 0.0
        self.window: list[tuple[int, int, int, int]] = []  # (bucket, calls, failures, slow)

    def bucket(self, t: float) -> int:
        return math.floor(t / (self.cfg.window / NB))

    def snap(self, now):
        if self.state == "open":
            return ("open", self.gen, max(0.0, self.until - now))
        if self.state == "half_open" and self.probes >= self.cfg.half_open_calls:
            return ("half_open", self.gen,
                    min(1.0, max(0.0, self.since + self.cfg.open_duration - now)))
        return (self.state, self.gen, 0.0)

    def enter(self, state, now, duration=0.0):
        self.state, self.gen, self.window = state, self.gen + 1, []
        if state == "open":
            self.until = now + duration
        if state == "half_open":
            self.probes, self.successes, self.since = 0, 0, now

    def tick(self, now):
        if self.state == "open" and now >= self.until:
            self.enter("half_open", now)

    def sync(self, now, calls, failures, slow, earlier, age):
        self.tick(now)
        if self.state == "closed" and (calls or failures or slow or earlier):
            newest = self.bucket(now)
            self.window.append((newest, calls, failures, slow))
            if earlier and self.bucket(now - age) > newest - NB:
                self.window.append((min(self.bucket(now - age), newest), earlier, 0, 0))
            self.window = [w for w in self.window if w[0] > newest - NB]
            c = sum(w[1] for w in self.window)
            f = sum(w[2] for w in self.window)
            s = sum(w[3] for w in self.window)
            cfg = self.cfg
            if c >= cfg.minimum_calls and c > 0 and (
                    f / c >= cfg.failure_rate
                    or (cfg.slow_call_duration is not None and s / c >= cfg.slow_call_rate)):
                self.enter("open", now, cfg.open_duration)
        return self.snap(now)

    def acquire(self, now):
        self.tick(now)
        if self.state == "closed":
            return True, self.snap(now)
        if self.state == "half_open":
            if (self.probes >= self.cfg.half_open_calls
                    and now - self.since >= self.cfg.open_duration):
                self.probes, self.successes, self.since = 0, 0, now  # the trials' lease expired
            if self.probes < self.cfg.half_open_calls:
                self.probes += 1
                return True, ("half_open", self.gen, 0.0)
        return False, self.snap(now)

    def result(self, now, gen, outcome):
        if self.state == "half_open" and self.gen == gen:
            if outcome == "failure":
                self.enter("open", now, self.cfg.open_duration)
            elif outcome == "success":
                self.successes += 1
                if self.successes >= self.cfg.half_open_calls:
                    self.enter("closed", now)
            else:
                self.probes = max(0, self.probes - 1)
        return self.snap(now)

    def force(self, now, state, duration):
        self.enter(state, now, duration)
        return self.snap(now)


params = st.builds(
    Params,
    failure_rate=st.sampled_from([0.25, 0.5, 1.0]),
    window=st.sampled_from([8.0, 16.0]),
    minimum_calls=st.integers(1, 6),
    open_duration=st.sampled_from([4.0, 15.0]),
    half_open_calls=st.integers(1, 3),
    slow_call_duration=st.sampled_from([None, 0.5]),
    slow_call_rate=st.sampled_from([0.5, 1.0]),
)


def test_breaker_store_matches_the_model(make_store):
    class Machine(RuleBasedStateMachine):
        @initialize(cfg=params)
        def start(self, cfg):
            self.clock = FakeClock(START)
            self.store = make_store(self.clock)
            self.cfg, self.model = cfg, BreakerModel(cfg)

        @rule(dt=ticks)
        def wait(self, dt):
            self.clock.advance(dt)

        @rule(calls=st.integers(0, 3), failures=st.integers(0, 3), slow=st.integers(0, 2),
              earlier=st.integers(0, 3), age=ticks)
        def sync(self, calls, failures, slow, earlier, age):
            failures, slow = min(failures, calls), min(slow, calls)
            got = self.store.breaker_sync("b", self.cfg, calls, failures, slow, earlier, age)
            persist(self.store, "breaker", "b", "window")
            want = self.model.sync(self.clock.now(), calls, failures, slow, earlier, age)
            assert snap_eq(got, want), (got, want)

        @rule()
        def acquire(self):
            granted, got = self.store.breaker_acquire("b", self.cfg)
            want_granted, want = self.model.acquire(self.clock.now())
            assert granted == want_granted and snap_eq(got, want), (granted, got, want)

        @rule(stale=st.booleans(), outcome=st.sampled_from(["success", "failure", "ignored"]))
        def result(self, stale, outcome):
            gen = self.model.gen - 1 if stale else self.model.gen
            got = self.store.breaker_result("b", self.cfg, gen, outcome)
            want = self.model.result(self.clock.now(), gen, outcome)
            assert snap_eq(got, want), (got, want)

        @rule(state=st.sampled_from(["open", "closed", "half_open"]), duration=ticks)
        def force(self, state, duration):
            got = self.store.breaker_force("b", self.cfg, state, duration or 1.0)
            want = self.model.force(self.clock.now(), state, duration or 1.0)
            assert snap_eq(got, want), (got, want)

        @invariant()
        def reads_agree(self):
            if hasattr(self, "store"):
                got = self.store.breaker_read("b", self.cfg)
                self.model.tick(self.clock.now())
                assert snap_eq(got, self.model.snap(self.clock.now())), got

    run_state_machine_as_test(Machine, settings=EXAMPLES)


# --------------------------------------------------------------------------- GCRA


def test_gcra_store_matches_the_model(make_store):
    class Machine(RuleBasedStateMachine):
        @initialize(rate=st.sampled_from([1.0, 2.0, 4.0, 8.0]), burst=st.integers(1, 5))
        def start(self, rate, burst):
            self.clock = FakeClock(START)
            self.store = make_store(self.clock)
            self.rate, self.burst = rate, burst
            self.tat: dict[str, float] = {}  # theoretical arrival time per key

        @rule(dt=ticks)
        def wait(self, dt):
            self.clock.advance(dt / 4)

        @rule(key=st.sampled_from(["a", "b"]), cost=st.integers(1, 3))
        def take(self, key, cost):
            cost = min(cost, self.burst)
            now, interval = self.clock.now(), 1.0 / self.rate
            new_tat = max(self.tat.get(key, now), now) + interval * cost
            excess = new_tat - now - interval * self.burst
            allowed = excess <= 0
            if allowed:
                self.tat[key] = new_tat
            got = self.store.gcra(key, self.rate, self.burst, cost)
            persist(self.store, "ratelimit", key)
            assert got[0] == allowed, (got, excess)
            assert math.isclose(got[1], 0.0 if allowed else excess, abs_tol=1e-5), got

    run_state_machine_as_test(Machine, settings=EXAMPLES)


# --------------------------------------------------------------------------- retry budget


def test_retry_budget_store_matches_the_model(make_store):
    class Machine(RuleBasedStateMachine):
        @initialize(ratio=st.sampled_from([0.0, 0.25, 0.5]), floor=st.sampled_from([0, 1, 3]),
                    window=st.sampled_from([8.0, 16.0]))
        def start(self, ratio, floor, window):
            self.clock = FakeClock(START)
            self.store = make_store(self.clock)
            self.ratio, self.floor, self.window = ratio, float(floor), window
            self.events: list[tuple[float, int, int]] = []  # (time, requests, retries)

        def live(self):
            width = self.window / NB
            newest = math.floor(self.clock.now() / width)
            return [e for e in self.events if math.floor(e[0] / width) > newest - NB]

        @rule(dt=ticks)
        def wait(self, dt):
            self.clock.advance(dt)

        @rule(requests=st.integers(0, 5))
        def add(self, requests):
            self.store.budget_add("r", requests, self.window)
            persist(self.store, "budget", "r", "window")
            self.events.append((self.clock.now(), requests, 0))

        @rule(requests=st.integers(0, 3))
        def spend(self, requests):
            self.events.append((self.clock.now(), requests, 0))
            live = self.live()
            allowed = (sum(e[2] for e in live) + 1
                       <= self.ratio * sum(e[1] for e in live) + self.floor)
            if allowed:
                self.events.append((self.clock.now(), 0, 1))
            got = self.store.budget_spend("r", requests, self.ratio, self.floor, self.window)
            persist(self.store, "budget", "r", "window")
            assert got == allowed

    run_state_machine_as_test(Machine, settings=EXAMPLES)
