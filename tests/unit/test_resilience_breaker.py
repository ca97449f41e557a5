"""Breaker transitions on a fake clock, and a hypothesis model check of the state machine."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from resilience.clock import FakeClock
from resilience.errors import CircuitOpen, ConfigError, PermanentError, TransientError
from resilience.stores import MemoryStore

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(**kw):
    clock = FakeClock()
    cfg = BreakerConfig(**{"minimum_calls": 4, "window": 10.0, "open_duration": 30.0, **kw})
    b = CircuitBreaker("dep", cfg, MemoryStore(clock), clock)
    events = []
    b.on_state_change(lambda name, old, new: events.append((name, old, new)))
    return b, clock, events


def ok(b):
    b.record(b.acquire(), None, 0.001)


def fail(b, exc=None):
    b.record(b.acquire(), exc or TransientError("x"), 0.001)


def test_opens_at_failure_rate_once_minimum_calls_seen():
    b, _clock, events = make()
    fail(b)
    fail(b)
    fail(b)
    assert b.state is CLOSED  # 3 calls < minimum 4
    ok(b)
    assert b.state is OPEN  # 3/4 >= 50%
    assert events == [("dep", CLOSED, OPEN)]
    with pytest.raises(CircuitOpen) as info:
        b.acquire()
    assert info.value.retry_after == pytest.approx(30.0)


def test_half_rate_opens_below_does_not():
    b, *_ = make()
    for _ in range(3):
        ok(b)
    fail(b)
    assert b.state is CLOSED  # 25%
    fail(b)
    assert b.state is CLOSED  # 2/5 = 40%
    fail(b)
    assert b.state is OPEN  # 3/6 = 50%


def test_rolling_window_forgets_old_calls():
    b, clock, _ = make()
    fail(b)
    fail(b)
    fail(b)
    clock.advance(10.5)  # those failures left the 10 s window
    ok(b)
    assert b.state is CLOSED


def test_half_open_after_open_duration_one_trial_then_closed():
    b, clock, events = make()
    for _ in range(4):
        fail(b)
    clock.advance(29.9)
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.advance(0.1)
    assert b.state is HALF
    trial = b.acquire()
    assert trial.probe
    with pytest.raises(CircuitOpen):
        b.acquire()  # the one trial slot is taken
    b.record(trial, None, 0.01)
    assert b.state is CLOSED
    assert [e[1:] for e in events] == [(CLOSED, OPEN), (OPEN, HALF), (HALF, CLOSED)]
    ok(b)


def test_half_open_failure_reopens_for_a_full_duration():
    b, clock, _ = make()
    for _ in range(4):
        fail(b)
    clock.advance(30)
    trial = b.acquire()
    b.record(trial, TransientError("still down"), 0.01)
    assert b.state is OPEN
    clock.advance(29)
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.advance(1)
    assert b.acquire().probe


def test_half_open_calls_bounded_and_all_must_succeed():
    b, clock, _ = make(half_open_calls=3)
    for _ in range(4):
        fail(b)
    clock.advance(30)
    trials = [b.acquire() for _ in range(3)]
    with pytest.raises(CircuitOpen):
        b.acquire()
    b.record(trials[0], None)
    b.record(trials[1], None)
    assert b.state is HALF
    b.record(trials[2], None)
    assert b.state is CLOSED


def test_ignored_probe_frees_its_slot_and_lost_probe_lease_expires():
    b, clock, _ = make()
    for _ in range(4):
        fail(b)
    clock.advance(30)
    trial = b.acquire()
    b.record(trial, PermanentError("bad request"))  # ignored: neither success nor failure
    assert b.state is HALF
    lost = b.acquire()  # this trial's process "dies" and never reports
    assert lost.probe
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.advance(30)
    assert b.acquire().probe  # lease expired: a new trial is allowed


def test_slow_calls_count_when_configured():
    b, *_ = make(slow_call_duration=0.5, slow_call_rate=0.5, failure_rate=1.0)
    for _ in range(4):
        b.record(b.acquire(), None, 0.6)
    assert b.state is OPEN


def test_errors_outside_record_count_as_success_ignore_counts_neither():
    b, *_ = make()
    for _ in range(10):
        fail(b, KeyError("caller bug"))
    for _ in range(10):
        fail(b, PermanentError("400"))
    assert b.state is CLOSED


def test_force_open_and_reset_guard_api():
    b, clock, _events = make()
    b.force_open(5)
    with pytest.raises(CircuitOpen), b.guard():
        pytest.fail("must not run")
    clock.advance(5)
    assert b.state is HALF
    b.reset()
    assert b.state is CLOSED
    assert b.call(lambda: 7) == 7
    with pytest.raises(ConfigError):
        b.force_open(0)


def test_config_validation():
    for kw in (
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"window": 0},
        {"minimum_calls": 0},
        {"open_duration": 0},
        {"half_open_calls": 0},
        {"slow_call_duration": -1},
        {"record": ("nope",)},
    ):
        with pytest.raises(ConfigError):
            BreakerConfig(**kw)


# ---------------------------------------------------------------- model-based property test


class Model:
    """The breaker as the seed states it, written as plainly as possible."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.state = "closed"
        self.calls = []  # (time, failed) while closed
        self.until = 0.0
        self.probes = 0
        self.successes = 0
        self.since = 0.0
        self.episode = 0  # one per state entered: a trial counts only in the episode it began

    def enter(self, state):
        self.state, self.episode = state, self.episode + 1

    def tick(self, now):
        if self.state == "open" and now >= self.until:
            self.enter("half_open")
            self.probes, self.successes, self.since = 0, 0, now

    def bucket(self, t):
        return int(t // (self.cfg.window / 10))

    def acquire(self, now):
        self.tick(now)
        if self.state == "closed":
            return "normal"
        if self.state == "half_open":
            if (
                self.probes >= self.cfg.half_open_calls
                and now - self.since >= self.cfg.open_duration
            ):
                self.probes, self.successes, self.since = 0, 0, now
            if self.probes < self.cfg.half_open_calls:
                self.probes += 1
                return "probe"
        return None

    def record(self, now, kind, failed, episode=None):
        if kind == "probe":
            if self.state != "half_open" or episode not in (None, self.episode):
                return  # a trial of an earlier HALF_OPEN says nothing about this one
            if failed:
                self.enter("open")
                self.until, self.calls = now + self.cfg.open_duration, []
            else:
                self.successes += 1
                if self.successes >= self.cfg.half_open_calls:
                    self.enter("closed")
                    self.calls = []
            return
        self.tick(now)
        if self.state != "closed":
            return
        self.calls.append((now, failed))
        newest = self.bucket(now)
        self.calls = [(t, f) for t, f in self.calls if self.bucket(t) > newest - 10]
        n = len(self.calls)
        fails = sum(f for _, f in self.calls)
        if n >= self.cfg.minimum_calls and fails / n >= self.cfg.failure_rate:
            self.enter("open")
            self.until, self.calls = now + self.cfg.open_duration, []


ops = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.booleans()),
        st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=20.0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    minimum=st.integers(1, 6),
    rate=st.sampled_from([0.25, 0.5, 1.0]),
    half_open_calls=st.integers(1, 3),
)
def test_breaker_matches_model(ops, minimum, rate, half_open_calls):
    clock = FakeClock()
    cfg = BreakerConfig(
        failure_rate=rate,
        minimum_calls=minimum,
        window=10.0,
        open_duration=15.0,
        half_open_calls=half_open_calls,
    )
    b = CircuitBreaker("m", cfg, MemoryStore(clock), clock)
    model = Model(cfg)
    in_flight = []  # permits of trials not reported yet, reported in order
    for op, arg in ops:
        now = clock.now()
        if op == "wait":
            clock.advance(arg)
            continue
        expected = model.acquire(now)
        try:
            permit = b.acquire()
        except CircuitOpen:
            assert expected is None, f"rejected but model says {expected}"
            continue
        assert expected is not None, "allowed but model says reject"
        assert permit.probe == (expected == "probe")
        if permit.probe and arg and len(in_flight) < 1:
            in_flight.append((permit, model.episode))  # hold one trial open for a while
            continue
        b.record(permit, TransientError("x") if arg else None, 0.001)
        model.record(now, expected, arg)
        assert b.state.value == (model.tick(clock.now()) or model.state)
    for permit, episode in in_flight:  # late reports: count only in the episode they began
        b.record(permit, None, 0.001)
        model.record(clock.now(), "probe", False, episode)
    assert b.state.value == (model.tick(clock.now()) or model.state)


def test_an_operator_close_reaches_a_process_holding_open_within_the_recheck():
    """Two processes' breakers on one store: B caches OPEN, but re-reads it every
    OPEN_RECHECK_S, so a close forced elsewhere is seen long before open_duration ends."""
    from resilience.breaker import OPEN_RECHECK_S

    clock = FakeClock()
    store = MemoryStore(clock)
    cfg = BreakerConfig(minimum_calls=4, window=10.0, open_duration=30.0)
    a = CircuitBreaker("dep", cfg, store, clock)
    b = CircuitBreaker("dep", cfg, store, clock)
    a.force_open()
    with pytest.raises(CircuitOpen) as info:
        b.acquire()
    assert info.value.retry_after == pytest.approx(30.0)  # the real reopen time, not the recheck
    a.reset()  # an operator closes it (tidegate breaker close)
    clock.advance(OPEN_RECHECK_S / 2)
    with pytest.raises(CircuitOpen) as info:
        b.acquire()  # still trusting its cached OPEN
    assert info.value.retry_after == pytest.approx(30.0 - OPEN_RECHECK_S / 2)
    clock.advance(OPEN_RECHECK_S / 2)
    b.record(b.acquire(), None, 0.001)
    assert b.state is CLOSED and b.retry_after == 0.0
