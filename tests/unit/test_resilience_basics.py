"""Errors, deadlines, priorities and load shedding, latency."""

import pickle

import pytest

from resilience import deadline as dl
from resilience.clock import FakeClock
from resilience.errors import (
    AttemptTimeout,
    Backpressure,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    PermanentError,
    RejectedError,
    RetriesExhausted,
    Shed,
    TransientError,
)
from resilience.latency import LatencyRecorder
from resilience.shedding import LoadShedder, Priority, SheddingThresholds


def test_error_tree_and_one_line_messages():
    e = CircuitOpen(retry_after=2.5, dependency="payments")
    assert isinstance(e, RejectedError) and isinstance(e, TransientError)
    assert str(e) == "payments: circuit open (retry after 2.500s)"
    assert isinstance(AttemptTimeout("x"), DeadlineExceeded)
    assert isinstance(Backpressure(priority=Priority.LOW), Shed)
    assert issubclass(ConfigError, ValueError)
    r = RetriesExhausted(last_exception=OSError("boom\nsecond line"), attempts=4)
    assert "\n" not in str(r) and r.attempts == 4
    assert not isinstance(PermanentError("x"), TransientError)


def test_errors_survive_pickling_with_attributes():
    e = pickle.loads(pickle.dumps(Shed(priority=Priority.LOW, retry_after=1.0, dependency="d")))
    assert (e.priority, e.retry_after, e.dependency) == (Priority.LOW, 1.0, "d")
    r = pickle.loads(pickle.dumps(RetriesExhausted(last_exception=OSError("x"), attempts=3)))
    assert r.attempts == 3


def test_deadline_scope_nests_to_the_tighter_budget():
    clock = FakeClock()
    assert dl.remaining() is None and dl.current() is None
    with dl.deadline_scope(0.2, clock=clock):
        assert dl.remaining() == pytest.approx(0.2)
        with dl.deadline_scope(5.0, clock=clock):
            assert dl.remaining() == pytest.approx(0.2)  # never extends the outer budget
        with dl.deadline_scope(0.05, clock=clock):
            assert dl.remaining() == pytest.approx(0.05)
        clock.advance(0.15)
        assert dl.remaining() == pytest.approx(0.05)
    assert dl.remaining() is None


def test_client_timeout_follows_the_budget():
    clock = FakeClock()
    assert dl.client_timeout(1.0) == 1.0
    with dl.deadline_scope(0.2, clock=clock):
        assert dl.client_timeout(1.0) == pytest.approx(0.2)
        assert dl.client_timeout(0.05) == pytest.approx(0.05)
        clock.advance(0.2)
        with pytest.raises(DeadlineExceeded):
            dl.client_timeout(1.0)
    with pytest.raises(ConfigError):
        dl.deadline_scope(0).__enter__()


def test_deadline_epoch_round_trip():
    d = dl.Deadline.after(10.0)
    again = dl.Deadline.from_epoch(d.to_epoch())
    assert abs(again.remaining() - d.remaining()) < 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("low", Priority.LOW),
        ("CRITICAL", Priority.CRITICAL),
        (" High ", Priority.HIGH),
        (2, Priority.MEDIUM),
        ("1", Priority.HIGH),
    ],
)
def test_priority_parse(text, expected):
    assert Priority.parse(text) is expected


@pytest.mark.parametrize("bad", ["urgent", 7, -1, None, True, 1.5])
def test_priority_parse_rejects_unknown(bad):
    with pytest.raises(ConfigError):
        Priority.parse(bad)


def test_shedding_order_and_critical_never_shed():
    load = [0.0]
    shedder = LoadShedder(lambda: load[0])
    for value, shed in [
        (0.5, set()),
        (0.8, {Priority.LOW}),
        (0.95, {Priority.LOW, Priority.MEDIUM}),
        (1.0, {Priority.LOW, Priority.MEDIUM, Priority.HIGH}),
        (50.0, {Priority.LOW, Priority.MEDIUM, Priority.HIGH}),
    ]:
        load[0] = value
        for p in Priority:
            if p in shed:
                with pytest.raises(Shed) as info:
                    shedder.admit(p)
                assert info.value.priority is p and info.value.retry_after == 1.0
            else:
                shedder.admit(p)


def test_critical_admitted_even_with_tiny_thresholds_and_broken_signal():
    shedder = LoadShedder(lambda: 10.0, {"low": 0.01, "medium": 0.01, "high": 0.01})
    shedder.admit(Priority.CRITICAL)
    assert shedder.admission_probability(Priority.CRITICAL, 99) == 1.0
    with pytest.raises(ConfigError):
        SheddingThresholds.from_mapping({"critical": 0.5})

    def broken():
        raise RuntimeError("signal down")

    LoadShedder(broken).admit(Priority.LOW)  # fails open


def test_thresholds_validated():
    with pytest.raises(ConfigError, match="low <= medium <= high"):
        SheddingThresholds(low=0.95, medium=0.9)
    with pytest.raises(ConfigError):
        SheddingThresholds(high=0)


def test_smooth_admission_probability():
    s = LoadShedder(lambda: 0.0)
    assert s.admission_probability(Priority.LOW, 0.5) == 1.0
    assert s.admission_probability(Priority.LOW, 0.75) == pytest.approx(0.5)
    assert s.admission_probability(Priority.LOW, 0.8) == 0.0
    assert s.admission_probability(Priority.HIGH, 0.95) == pytest.approx(0.5)
    # LOW always gets a smaller share than MEDIUM, MEDIUM than HIGH
    for load in (0.72, 0.85, 0.93, 0.99):
        pl, pm, ph = (
            s.admission_probability(p, load) for p in (Priority.LOW, Priority.MEDIUM, Priority.HIGH)
        )
        assert pl <= pm <= ph
    heavy = LoadShedder(lambda: 0.75, error=Backpressure)
    with pytest.raises(Backpressure):
        heavy.admit_smooth(Priority.LOW, rng=lambda: 0.6)
    heavy.admit_smooth(Priority.LOW, rng=lambda: 0.4)


def test_latency_suggested_timeout_is_p99_times_two():
    rec = LatencyRecorder(size=1000)
    assert rec.suggested_timeout() is None
    for i in range(1, 1001):
        rec.record(i / 1000 * 0.08)  # 0.08 ms .. 80 ms
    assert rec.p99() == pytest.approx(0.0792)
    assert rec.suggested_timeout() == pytest.approx(0.1584)
    for _ in range(10_000):
        rec.record(0.001)
    assert len(rec._samples) == 1000  # bounded
    assert rec.p99() == 0.001  # the window follows what the dependency does now
