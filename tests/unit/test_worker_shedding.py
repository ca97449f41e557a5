"""Worker-side shedding (workers/shedding.py): the load a message meets, the ladder LOW ->
MEDIUM -> HIGH (never CRITICAL), one log line per spell, and the policy file's [shedding]."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from resilience.errors import Shed
from resilience.shedding import Priority
from workers.policy_file import PolicyFileError, parse_policy
from workers.shedding import SHED, QueueShedder, ShedRule, WorkerLoad, message_age

NOW = 1_000_000.0


def _shedder(in_flight: int, concurrency: int, max_age_s: float = 100.0) -> QueueShedder:
    load = WorkerLoad(concurrency)
    load._in_flight = in_flight
    return QueueShedder("search", ShedRule(max_age_s), load, clock=lambda: NOW)


def _shed(s: QueueShedder, priority: Priority, waited: float) -> bool:
    try:
        s.admit(priority, NOW - waited, None, None)
    except Shed:
        return True
    return False


def test_the_ladder_by_age_on_a_full_worker() -> None:
    s = _shedder(2, 2)
    expected = {  # waited (of 100 s) -> the classes shed
        50: set(),
        85: {Priority.LOW},
        95: {Priority.LOW, Priority.MEDIUM},
        120: {Priority.LOW, Priority.MEDIUM, Priority.HIGH},
        10_000: {Priority.LOW, Priority.MEDIUM, Priority.HIGH},
    }
    for waited, classes in expected.items():
        assert {p for p in Priority if _shed(s, p, waited)} == classes, waited


def test_free_slots_weigh_the_age_down() -> None:
    # half the slots free: an 85%-old LOW is the tail of a drained backlog, not overload
    assert not _shed(_shedder(1, 2), Priority.LOW, 85)
    assert _shed(_shedder(1, 2), Priority.LOW, 170)
    # not a worker (eager call, no concurrency known): never shed
    assert not _shed(_shedder(1, 0), Priority.LOW, 10_000)


def test_the_shed_message_says_why() -> None:
    with pytest.raises(Shed) as info:
        _shedder(2, 2).admit(Priority.MEDIUM, NOW - 95, None, None)
    assert "waited 95.0s of 100.0s with 2/2 slots busy (load 0.95)" in str(info.value)
    assert "MEDIUM is shed from 0.90" in str(info.value)


def test_message_age_deadline_eta_and_unknown() -> None:
    # with a deadline: the job's whole life is the budget, counted from its enqueue
    assert message_age(NOW - 8, None, NOW + 2, 30.0, NOW) == (8.0, 10.0)
    # a retry: the wait counts from the end of its countdown (Celery's ISO eta)
    eta = datetime.fromtimestamp(NOW - 3, UTC).isoformat()
    assert message_age(NOW - 60, eta, None, 30.0, NOW) == pytest.approx((3.0, 30.0))
    # no enqueue time (a plain send_task): no age, never shed
    assert message_age(None, None, None, 30.0, NOW) is None
    # no deadline and no max_age_s (the default): a backlog is never shed by age, however old
    assert message_age(NOW - 3600, None, None, None, NOW) is None
    assert message_age(NOW - 8, None, NOW + 2, None, NOW) == (8.0, 10.0)  # a deadline still
    default = QueueShedder("search", ShedRule(), WorkerLoad(2), clock=lambda: NOW)
    default.worker_load._in_flight = 2
    assert default.admit(Priority.LOW, NOW - 3600, None, None) is None
    assert not _shed(_shedder(2, 2), Priority.LOW, 0) and _shedder(2, 2).admit(
        Priority.LOW, None, None, None) is None


def test_counted_by_queue_and_priority_and_logged_once_per_spell(
        caplog: pytest.LogCaptureFixture) -> None:
    s = _shedder(2, 2)
    before = SHED.labels(queue="search", priority="low")._value.get()
    caplog.set_level(logging.INFO, logger="tidegate.shedding")
    for _ in range(5):
        assert _shed(s, Priority.LOW, 90)
    assert _shed(s, Priority.MEDIUM, 95)
    assert not _shed(s, Priority.CRITICAL, 10_000)
    assert not _shed(s, Priority.HIGH, 79)  # just below LOW's threshold: the spell goes on
    assert _shed(s, Priority.LOW, 81)  # ... so hovering around it logs nothing more
    assert not _shed(s, Priority.HIGH, 10)  # well below it: the spell ends
    assert not _shed(s, Priority.HIGH, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("queue search: worker overloaded, shedding started")
    assert lines[1].startswith("queue search: shedding ended after 0.0s")
    assert lines[1].endswith("shed low 6, medium 1")
    assert SHED.labels(queue="search", priority="low")._value.get() == before + 6


def test_worker_load_counts_running_deliveries() -> None:
    load = WorkerLoad(4)
    with load.running(), load.running():
        assert load.in_flight == 2 and load.utilisation() == 0.5
    assert load.in_flight == 0


def _doc(**shedding: object) -> dict:
    return {"dependencies": {
        "search": {"url": "http://127.0.0.1:1", "idempotent": True},
        "email": {"url": "http://127.0.0.1:2", "idempotent": True}},
        "autoscaling": {"email": {"acceptable_wait_s": 12.0}},
        "shedding": shedding}


def test_policy_file_shedding_section() -> None:
    parsed = parse_policy(_doc(low=0.5, search={"max_age_s": 5, "high": 2.0},
                               email={"enabled": False}))
    search, email = parsed.shedding["search"], parsed.shedding["email"]
    assert search.max_age_s == 5 and search.thresholds.low == 0.5
    assert search.thresholds.high == 2.0 and search.enabled
    # left out: no age budget for jobs without a deadline (the autoscaler's target is not one)
    assert email.max_age_s is None and not email.enabled
    assert parse_policy(_doc()).shedding["search"].max_age_s is None
    with pytest.raises(PolicyFileError) as info:
        parse_policy(_doc(serch={"low": 0.5}, search={"max_age_s": 0, "lo": 1},
                          email={"low": 0.95}))
    errors = info.value.errors
    assert "[shedding.search.max_age_s]: input should be greater than 0, got 0" in errors
    assert "[shedding.search.lo]: unknown key; did you mean 'low'?" in errors
    with pytest.raises(PolicyFileError) as info:
        parse_policy(_doc(serch={"low": 0.5}, email={"low": 0.95}))
    assert info.value.errors[0] == "[shedding.serch]: unknown queue; did you mean 'search'?"
    assert info.value.errors[1].startswith("[shedding.email]: shedding thresholds must satisfy")
