"""An overloaded worker sheds what it takes from its queue: LOW first, then MEDIUM, then HIGH,
never CRITICAL; each shed job is dead-lettered unrun (reason ``shed``), says so in its job
status, and ``tidegate dlq replay`` brings it back. Real Redis broker, a real worker."""

# ruff: noqa: F811  (pytest fixtures imported from _delivery are parameters here)
from __future__ import annotations

import time

import pytest

from tests.conftest import STATE_REDIS_URL
from tests.integration._delivery import (  # noqa: F401  (fixtures)
    LIMITS,
    cli,
    dead_letters,
    fast_policy,
    wait_dead,
)
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

MAX_AGE_S = 300.0  # the queue's age budget: the test's own seconds hardly move the fractions
# (priority, fraction of the budget already waited) -> shed? (on a full worker: -c 1)
LADDER = {
    ("low", 0.85): True, ("medium", 0.85): False, ("high", 0.85): False,
    ("critical", 0.85): False,
    ("low", 0.95): True, ("medium", 0.95): True, ("high", 0.95): False,
    ("critical", 0.95): False,
    ("low", 1.2): True, ("medium", 1.2): True, ("high", 1.2): True, ("critical", 1.2): False,
    ("critical", 50.0): False,
}


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_overloaded_worker_sheds_low_first_never_critical(broker, sims, fast_policy,
                                                          start_worker, state_redis, tmp_path):
    from resilience.shedding import Priority
    from workers.application import create_app
    from workers.cluster_metrics import read_cluster_counters
    from workers.jobs import JobStatuses
    from workers.settings import load_settings
    from workers.topology import broker_priority

    policy = tmp_path / "shed-policy.toml"
    policy.write_text(fast_policy.read_text() + f"\n[shedding.search]\nmax_age_s = {MAX_AGE_S}\n")
    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy)
    app = create_app(settings)
    sims["search"].control(latency_ms=30)
    now = time.time()

    def send(priority: str, enqueued_at: float, deadline: float | None = None) -> str:
        headers = {"tidegate_priority": priority.upper(), "tidegate_enqueued_at": enqueued_at}
        if deadline is not None:
            headers["tidegate_deadline"] = deadline
        doc = f"doc-{priority}-{len(docs)}"
        job = app.send_task("search.index", args=[doc], queue="search", headers=headers,
                            retry=False,
                            priority=broker_priority(Priority.parse(priority), "redis")).id
        docs[job] = doc
        return job

    docs: dict[str, str] = {}

    # old messages of every class, queued before the worker starts
    expected = {send(p, now - f * MAX_AGE_S): shed for (p, f), shed in LADDER.items()}
    # with a deadline, the job's own life is the budget: 85 s of 100 s waited
    expected[send("low", now - 85, now + 15)] = True
    expected[send("high", now - 85, now + 15)] = False
    fresh = send("low", now)  # the last one taken, fresh: the spell of shedding ends
    expected[fresh] = False

    worker = start_worker("search", concurrency=1, env={"TIDEGATE_POLICY_FILE": str(policy),
                                                        **LIMITS})
    jobs = JobStatuses(state_redis, 3600)
    final = ("succeeded", "dead_lettered")
    states = wait_until(lambda: (d := {j: jobs.read(j) for j in expected})
                        and all(v and v["state"] in final for v in d.values()) and d,
                        30, interval=0.2, message="every job finished")
    shed = {j for j, d in states.items() if d["state"] == "dead_lettered"}
    assert shed == {j for j, s in expected.items() if s}, {j: states[j] for j in shed}
    # each shed job's fate, in its job status (what GET /v1/jobs/{id} and `tidegate job` read)
    for j in shed:
        assert (states[j]["reason"], states[j]["dlq"]) == ("shed", "search.dlq")
        assert "worker overloaded" in states[j]["error"]

    records = wait_dead(app, "search", n=len(shed))
    assert {r.task_id for r in records} == shed and {r.reason for r in records} == {"shed"}
    # never run: nothing of a shed job reached the search service, the others all did
    applied = set(sims["search"].ledger()["effects"])
    assert applied == {f"index:{docs[j]}" for j in expected if j not in shed}

    one = next(r for r in records if r.headers.get("tidegate_priority") == "LOW")
    replay = cli(broker, policy, "dlq", "replay", "search", "--id", one.id)
    assert replay.returncode == 0, replay.stderr
    # replayed, its wait starts again: the idle worker runs it
    wait_until(lambda: jobs.read(one.task_id)["state"] == "succeeded", 20, interval=0.2,
               message="the replayed shed job runs")
    assert len(dead_letters(app, "search")) == len(shed) - 1

    worker.stop()  # flushes its counters to the cluster hash
    log = worker.output()
    assert log.count("queue search: worker overloaded, shedding started") == 1, log[-3000:]
    assert log.count("queue search: shedding ended") == 1, log[-3000:]
    assert "as shed" not in log  # not one line per job
    counts = {lb["priority"]: v for lb, v in read_cluster_counters(state_redis)
              .get("tidegate_cluster_worker_shed", []) if lb["queue"] == "search"}
    want = {p: sum(1 for (q, _), s in LADDER.items() if s and q == p) for p in ("low",
                                                                                 "medium",
                                                                                 "high")}
    want["low"] += 1  # the one with a deadline
    assert counts == want and "critical" not in counts
    app.close()
