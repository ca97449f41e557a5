"""Quiet logs: per-request lines leave INFO, and a failed attempt names its real cause first."""

from __future__ import annotations

import logging

import pytest

from resilience.errors import DeadlineExceeded, RetriesExhausted


@pytest.fixture
def levels():
    from workers.logs import PER_REQUEST_LOGGERS

    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in PER_REQUEST_LOGGERS}
    yield PER_REQUEST_LOGGERS
    root.setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def test_per_request_loggers_go_to_warning_at_info(levels) -> None:
    from workers.logs import quiet_per_request_logs

    logging.getLogger().setLevel(logging.INFO)
    quiet_per_request_logs()
    assert {n: logging.getLogger(n).isEnabledFor(logging.INFO) for n in levels} == dict.fromkeys(
        levels, False)
    assert logging.getLogger("celery.app.trace").isEnabledFor(logging.ERROR)  # failures show


def test_debug_keeps_every_line(levels) -> None:
    from workers.logs import quiet_per_request_logs

    logging.getLogger().setLevel(logging.DEBUG)
    for name in levels:
        logging.getLogger(name).setLevel(logging.NOTSET)
    quiet_per_request_logs()
    assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in levels)


def test_log_tasks_keeps_the_task_lines_only(levels, monkeypatch) -> None:
    from workers.logs import TASK_LOGGERS, quiet_per_request_logs

    monkeypatch.setenv("TIDEGATE_LOG_TASKS", "true")
    logging.getLogger().setLevel(logging.INFO)
    for name in levels:
        logging.getLogger(name).setLevel(logging.NOTSET)
    quiet_per_request_logs()
    shown = {n for n in levels if logging.getLogger(n).isEnabledFor(logging.INFO)}
    assert shown == set(TASK_LOGGERS)


def test_cause_comes_first() -> None:
    from workers.resilient import cause_first

    last = ConnectionError("503 Service Unavailable from email")
    try:
        try:
            raise last
        except ConnectionError as exc:
            raise DeadlineExceeded("email: deadline leaves no room for attempt 3 (wait 1.2s, "
                                   "0.4s left); last error: ConnectionError: 503") from exc
    except DeadlineExceeded as exc:
        line = cause_first(exc)
    assert line.startswith("ConnectionError: 503 Service Unavailable from email (Deadline")
    assert line.count("503") == 1  # the wrapper's copy of the cause is not repeated
    exhausted = RetriesExhausted("email: budget exhausted; last error: X", last_exception=last,
                                 attempts=2, dependency="email")
    assert cause_first(exhausted).startswith("ConnectionError: 503")
    assert cause_first(ValueError("plain")) == "ValueError: plain"
