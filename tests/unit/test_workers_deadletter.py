"""Dead-letter records and poison checks: pure logic, no broker."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from workers import deadletter as dl
from workers.poison import Poison, check_message
from workers.resilient import _jsonable


def test_record_round_trips_through_json_and_keeps_the_error():
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = dl.DeadLetter(reason=dl.PERMANENT, queue="payments", task="payments.charge",
                               task_id="t1", args=["a", 1], kwargs={"k": 2},
                               idempotent=False).with_error(exc)
    back = dl.parse(json.dumps(record.to_dict()), {dl.RECORD_MARK: 1}, "payments.dlq")
    assert back == record
    assert back.exception_type == "ValueError" and "boom" in back.traceback


def test_native_dead_lettered_task_message_is_read_as_a_record():
    body = json.dumps([["acct", 5], {"currency": "EUR"}, {}])
    headers = {"task": "payments.charge", "id": "t2", "retries": 2,
               "tidegate_idempotency_key": "k-2",
               "x-death": [{"queue": "payments", "reason": "rejected"}]}
    record = dl.parse(body.encode(), headers, "payments.dlq")
    assert (record.reason, record.queue, record.task, record.task_id) == (
        dl.NATIVE, "payments", "payments.charge", "t2")
    assert record.args == ["acct", 5] and record.kwargs == {"currency": "EUR"}
    assert record.idempotency_key == "k-2" and record.attempts == 3
    assert "rejected" in record.exception_message


@pytest.mark.parametrize(("idempotent", "key", "needs"), [
    (False, None, True), (False, "k", False), (True, None, False), (None, None, False)])
def test_replay_needs_force_only_for_unkeyed_non_idempotent(idempotent, key, needs):
    record = dl.DeadLetter(reason=dl.OUTCOME_UNKNOWN, queue="q", task="t",
                           idempotent=idempotent, idempotency_key=key)
    assert record.needs_force is needs
    if needs:
        with pytest.raises(dl.NotReplayable, match="--force"):
            dl.check_replayable(record, force=False)
    dl.check_replayable(record, force=True)


@pytest.mark.parametrize("reason", sorted(dl.NOT_REPLAYABLE))
def test_poison_records_are_never_replayed(reason):
    record = dl.DeadLetter(reason=reason, queue="q", task="email.send", idempotent=True)
    with pytest.raises(dl.NotReplayable, match="no runnable task"):
        dl.check_replayable(record, force=True)


def _message(headers, body, content_type="application/json"):
    from kombu.serialization import loads

    def decode():
        return loads(body, content_type, "utf-8", accept=["application/json"])

    return SimpleNamespace(headers=headers, body=body, decode=decode, delivery_info={})


def test_check_message_sorts_the_three_kinds_of_poison():
    from workers import app

    app.loader.import_default_modules()
    good = json.dumps([["a@x", "s"], {}, {}])
    check_message(app, _message({"task": "email.send", "id": "1"}, good))
    cases = {
        dl.UNDECODABLE: _message({"task": "email.send", "id": "2"}, "{nope"),
        dl.UNKNOWN_TASK: _message({"task": "nope.task", "id": "3"}, good),
        dl.INVALID_ARGUMENTS: _message({"task": "email.send", "id": "4"},
                                       json.dumps([[], {"colour": 1}, {}])),
    }
    for reason, message in cases.items():
        with pytest.raises(Poison) as info:
            check_message(app, message)
        assert info.value.reason == reason
    with pytest.raises(Poison) as info:
        check_message(app, _message({}, json.dumps({"no": "task"})))
    assert info.value.reason == dl.UNDECODABLE


def test_fallback_results_become_tagged_json():
    from resilience.fallback import Deferred, Unavailable

    out = _jsonable({"id": "c1", "receipt": Unavailable("email", "down", "later"),
                     "more": [Deferred("d1", "email")]})
    assert out["receipt"] == {"type": "Unavailable", "dependency": "email", "reason": "down",
                              "message": "later", "outcome": "unknown"}
    assert out["more"][0]["type"] == "Deferred"
    json.dumps(out)


@pytest.mark.parametrize(("asked", "expected"), [
    ([None, None], [90.0, 60.0]),      # the producer gave none: the worker's own
    ([3600, 1800], [90.0, 60.0]),      # longer than the worker allows: capped
    ([10, 5], [10, 5]),                # shorter: kept
    ("junk", [90.0, 60.0]),
])
def test_a_message_cannot_raise_the_workers_time_limits(asked, expected):
    from workers.poison import clamp_time_limits

    headers = {"task": "email.send", "timelimit": asked}
    clamp_time_limits(headers, 90.0, 60.0)
    assert headers["timelimit"] == expected


def test_replay_keeps_identity_and_key_but_not_the_deadline_or_attempts():
    from celery import Celery

    from workers.installation import install
    from workers.settings import load_settings

    sent = {}
    app = Celery("replay-test", set_as_current=False)
    install(app, load_settings(broker_url="redis://127.0.0.1:1/0"))  # never connected
    app.send_task = lambda name, **kw: sent.update(name=name, **kw)
    record = dl.DeadLetter(
        reason=dl.RETRIES_EXHAUSTED, queue="email", task="email.send", task_id="t-9",
        args=["a@x", "s"], kwargs={"body": "b"}, idempotency_key="k-9", idempotent=True,
        headers={"tidegate_idempotency_key": "k-9", "tidegate_priority": "CRITICAL",
                 "tidegate_deadline": 1.0, "tidegate_attempt": 4, "other": "x"})
    assert dl.DeadLetters(app).replay_message(record) == "t-9"
    assert sent["name"] == "email.send" and sent["task_id"] == "t-9"
    assert sent["queue"] == "email" and sent["args"] == ["a@x", "s"]
    assert sent["priority"] == 0  # CRITICAL on Redis
    # its wait starts at the replay: a worker sheds by it (workers.shedding)
    enqueued = sent["headers"].pop("tidegate_enqueued_at")
    assert time.time() - 5 < enqueued <= time.time()
    assert sent["headers"] == {"tidegate_idempotency_key": "k-9",
                               "tidegate_priority": "CRITICAL",
                               "tidegate_replayed_from": record.id}
