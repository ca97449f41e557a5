"""The demo's accounting on hand-made records: every job lands in exactly one place, and a
job found nowhere, or an unkeyed charge sent twice, fails the proof."""

from __future__ import annotations

from types import SimpleNamespace

from tidegate.demo.accounting import Records, reconcile
from tidegate.demo.storm import Job
from workers.deadletter import DeadLetter
from workers.replayer import replay_task_id


def job(n: int, task: str, priority: str, key: str | None, status: int = 202,
        state: str = "queued", id_: str | None = None) -> Job:
    return Job(n, "s", "c", task, priority, key, 1000.0, status=status, state=state,
               id=id_ or f"00000000-0000-0000-0000-{n:012d}")


def effect(requests: int = 1) -> dict:
    return {"op": "x", "requests": requests, "applied_at": 1001.5, "payload": {}}


def records(**over) -> Records:
    base = dict(
        ledgers={"payments": {"effects": {}}, "search": {"effects": {}},
                 "email": {"effects": {}}},
        dead_letters={"payments": [], "search": [], "email": []}, still_deferred=[], marks={},
        email_worker_log="", replay_task_id=replay_task_id)
    base.update(over)
    return Records(**base)


def test_each_job_lands_once_and_the_balance_holds() -> None:
    jobs = [
        job(1, "search.index", "high", "k1"),
        job(2, "search.index", "low", "k2", status=503),
        job(3, "search.index", "low", "k3", status=429),
        job(4, "payments.charge", "critical", None),
        job(5, "email.send", "medium", "k5", state="deferred"),
        job(6, "email.send", "medium", "k6", state="deferred"),
        job(7, "payments.charge", "critical", "k7"),
    ]
    dlq = DeadLetter(reason="transient_failure_not_idempotent", queue="payments",
                     task="payments.charge", task_id=jobs[3].id)
    rec = records(
        ledgers={"payments": {"effects": {"k7": effect()}},
                 "search": {"effects": {"k1": effect()}},
                 "email": {"effects": {"k5": effect()}}},
        dead_letters={"payments": [dlq], "search": [], "email": []},
        still_deferred=[SimpleNamespace(request=SimpleNamespace(idempotency_key="k6"))],
        marks={"search.index:key:k1": {"s": "done"}, f"payments.charge:task:{jobs[3].id}":
               {"s": "dead"}},
        job_states={replay_task_id("k5"): {"state": "succeeded"},
                    replay_task_id("k6"): {"state": "queued"}})
    acc = reconcile(jobs, rec)
    got = {o.job.n: o.outcome for o in acc.outcomes}
    assert got == {1: "served", 2: "shed_503", 3: "rate_limited_429", 4: "dead_lettered",
                   5: "served", 6: "still_deferred", 7: "served"}
    five = next(o for o in acc.outcomes if o.job.n == 5)
    assert five.deferred_by == "api" and five.replayed and five.seconds_to_effect == 1.5
    six = next(o for o in acc.outcomes if o.job.n == 6)
    assert six.deferred_by == "api" and not six.replayed  # published, no worker took it up
    assert acc.balanced and acc.ok, acc.checks


def test_a_job_found_nowhere_is_missing_and_fails_the_proof() -> None:
    acc = reconcile([job(1, "search.index", "high", "k1")], records())
    assert acc.by_outcome["missing"] == 1
    assert not acc.balanced and not acc.ok


def test_an_unkeyed_charge_sent_twice_fails_a_check() -> None:
    j = job(1, "payments.charge", "critical", None)
    rec = records(ledgers={"payments": {"effects": {j.id: effect()},
                                        "failed_attempts": {j.id: 1}},
                           "search": {"effects": {}}, "email": {"effects": {}}})
    acc = reconcile([j], rec)
    assert acc.balanced
    failed = [name for name, ok, _ in acc.checks if not ok]
    assert failed == ["no unkeyed (non-idempotent) charge sent to the provider twice"]


def test_an_effect_no_job_explains_fails_a_check() -> None:
    rec = records(ledgers={"payments": {"effects": {}}, "search": {"effects": {"zz": effect()}},
                           "email": {"effects": {}}})
    acc = reconcile([], rec)
    assert acc.unexpected_effects == {"search": ["zz"]} and not acc.ok


def test_a_job_still_in_the_broker_is_listed_as_queued_not_missing() -> None:
    j = job(1, "search.index", "low", "k1")
    acc = reconcile([j], records(still_queued=frozenset({j.id})))
    assert acc.by_outcome["still_queued"] == 1 and acc.balanced


def test_what_a_failed_charge_told_its_user_is_checked_against_the_ledger() -> None:
    from tidegate.demo.report import _told_lines

    told = [job(1, "payments.charge", "critical", None), job(2, "payments.charge", "critical",
                                                             None)]
    dlq = [DeadLetter(reason=r, queue="payments", task="payments.charge", task_id=j.id)
           for r, j in (("dependency_unavailable", told[0]),
                        ("transient_failure_not_idempotent", told[1]))]
    states = {told[0].id: {"state": "dead_lettered", "outcome": "not_attempted",
                           "message": "you have not been charged"},
              told[1].id: {"state": "dead_lettered", "outcome": "unknown",
                           "message": "not known yet"}}

    def run(charged: set[str], job_states: dict = states) -> tuple[list[str], list[str]]:
        rec = records(ledgers={"payments": {"effects": {j: effect() for j in charged}},
                               "search": {"effects": {}}, "email": {"effects": {}}},
                      dead_letters={"payments": dlq, "search": [], "email": []},
                      job_states=job_states)
        acc = reconcile(told, rec)
        return [name for name, ok, _ in acc.checks if not ok], _told_lines(acc)

    failed, lines = run({told[1].id})  # the unknown one was charged after all: honest
    assert failed == []
    assert lines[1] == ('  - `not_attempted` x 1 (no attempt reached the provider; the '
                        "provider's ledger shows 0 of them charged): \"you have not been "
                        'charged"')
    assert "`unknown` x 1" in lines[2] and "shows 1 of them charged" in lines[2]
    failed, _ = run({told[0].id})  # told "not charged", and charged: the check fails
    assert "no one told 'not charged' was charged (job status vs provider ledger)" in failed
    # charged, dead-lettered, and nothing says its outcome was unknown: that fails too
    failed, _ = run({told[1].id}, {told[0].id: states[told[0].id]})
    assert failed == ["a dead-lettered job's effect happened only when its outcome is unknown"]
