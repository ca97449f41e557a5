"""No concurrent double run: a redelivered task whose earlier run is in flight is parked.

Run leases on real Redis (workers.idempotency), then a real worker that gets a second copy of a
keyed charge while the first copy is still at the provider: the copy waits for the first run's
outcome (parked, then acked as a duplicate), it never runs alongside it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support.policy import with_timeouts
from tests.support.procs import wait_until
from workers.idempotency import IdempotencyStore, MarkState

pytestmark = pytest.mark.integration


def test_a_live_lease_makes_the_mark_live_and_a_lapsed_one_hands_the_run_over(state_redis):
    first = IdempotencyStore(state_redis, ttl_s=60, lease_s=0.5)
    second = IdempotencyStore(state_redis, ttl_s=60, lease_s=0.5)
    mark = first.begin("t", "key:k", worker="w1")
    assert (mark.state, mark.leased, mark.live) == (MarkState.NEW, True, False)
    # Extended by the first store's thread for as long as the run lasts (several lease TTLs).
    for _ in range(3):
        wait_until(lambda: state_redis.pttl("tidegate:idem-run:t:key:k") > 400, 5,
                   message="the lease extended")
        seen = second.begin("t", "key:k", worker="w2")
        assert (seen.state, seen.live, seen.leased) == (MarkState.STARTED, True, False)
    first.let_go("t", "key:k")  # its worker died: nobody extends the lease any more
    taken = wait_until(lambda: (m := second.begin("t", "key:k", worker="w2")).leased and m, 5,
                       message="the lapsed lease taken over")
    assert (taken.state, taken.live, taken.worker) == (MarkState.STARTED, False, "w1")
    second.finish("t", "key:k", {"ok": 1})
    assert state_redis.exists("tidegate:idem-run:t:key:k") == 0
    again = first.begin("t", "key:k")
    assert (again.state, again.live, again.leased) == (MarkState.DONE, False, False)
    assert state_redis.exists("tidegate:idem-run:t:key:k") == 0  # a duplicate holds no lease
    first.close()
    second.close()


def test_a_fresh_run_holds_a_lease_without_a_mark(state_redis):
    store = IdempotencyStore(state_redis, ttl_s=60, lease_s=5)
    store.hold("t", "task:f")
    seen = store.begin("t", "task:f")
    assert (seen.state, seen.live) == (MarkState.NEW, True)
    store.release("t", "task:f")
    assert store.begin("t", "task:f").live is False
    store.close()


def test_the_running_status_rides_with_the_mark_and_the_lease(state_redis):
    """A job's "running" and "succeeded" statuses go with the mark's own writes: in the begin
    script only for a first run that took the lease, never over a finished job's status."""
    from workers.jobs import JobStatuses, job_key
    from workers.redis_line import ReplyLater

    line = ReplyLater(state_redis)
    store = IdempotencyStore(state_redis, ttl_s=60, lease_s=5, replies=line)
    jobs = JobStatuses(state_redis, 60, replies=line)
    mark = store.begin("t", "key:s", worker="w1", status=jobs.due("j1", "running"))
    assert (mark.state, mark.leased, mark.status_sent) == (MarkState.NEW, True, True)
    assert jobs.read("j1")["state"] == "running"
    assert store.finish("t", "key:s", 1, also=(jobs.due("j1", "succeeded"),)) is True
    line.flush()
    assert jobs.read("j1")["state"] == "succeeded"
    assert state_redis.exists("tidegate:idem-run:t:key:s") == 0
    # a duplicate finds the mark done: no status written over "succeeded"
    dup = store.begin("t", "key:s", worker="w2", status=jobs.due("j1", "running"))
    assert (dup.state, dup.status_sent) == (MarkState.DONE, False)
    assert jobs.read("j1")["state"] == "succeeded"
    # a fresh run's lease and its status in one write
    assert store.hold("t", "task:j2", also=(jobs.due("j2", "running"),)) is True
    line.flush()
    assert jobs.read("j2")["state"] == "running"
    assert state_redis.exists("tidegate:idem-run:t:task:j2") == 1
    assert state_redis.exists(job_key("j3")) == 0
    store.close()


def test_a_redelivered_copy_waits_for_the_run_in_flight(broker, sims, producer, start_worker,
                                                       policy_file, tmp_path: Path):
    sims["email"].control(latency_ms=4000)  # the first run is at the provider for 4 s
    slow = with_timeouts(policy_file, "email", 10_000, 20_000, tmp_path / "policy.toml")
    worker = start_worker("email", concurrency=2, env={"TIDEGATE_POLICY_FILE": str(slow)})
    first = producer.enqueue("email.send", ["a@x", "hi"], idempotency_key="mail-lease")
    wait_until(lambda: "mail-lease" in sims["email"].ledger()["in_progress"], 30,
               message="the first run at the provider")
    # The same task again, as a redelivery would bring it (same id, same key).
    producer.enqueue("email.send", ["a@x", "hi"], idempotency_key="mail-lease",
                     task_id=first.id)
    wait_until(lambda: "parked" in worker.output(), 30, message="the copy parked")
    wait_until(lambda: "duplicate of a finished task" in worker.output(), 60,
               message="the copy acked as a duplicate once the first run was done")
    ledger = sims["email"].ledger()
    assert ledger["applied"] == 1 and ledger["conflicts"] == 0, ledger
    assert ledger["effects"]["mail-lease"]["requests"] == 1  # the copy never called


def test_the_mark_script_goes_on_the_reply_later_line(state_redis):
    """A non-idempotent task's mark round trip is a call on its thread's reply-later line
    (no pool checkout); an unloaded script or a broken line falls back to the client."""
    from workers.jobs import JobStatuses
    from workers.redis_line import ReplyLater

    name = f"tidegate-test-{uuid.uuid4().hex[:8]}"
    line = ReplyLater(state_redis, name=name)
    store = IdempotencyStore(state_redis, ttl_s=60, lease_s=5, replies=line)
    jobs = JobStatuses(state_redis, 60, replies=line)
    store.begin("t", "key:warm", status=jobs.due("jw", "running"))  # loads the script
    state_redis.delete("tidegate:idem:t:key:l1", "tidegate:idem-run:t:key:l1")
    mark = store.begin("t", "key:l1", worker="w1", status=jobs.due("jl1", "running"))
    assert (mark.state, mark.leased, mark.status_sent) == (MarkState.NEW, True, True)
    [on_line] = [c for c in state_redis.client_list() if c.get("name") == name]
    assert on_line["cmd"] == "evalsha"  # the line's connection ran it, not the pool's
    assert jobs.read("jl1")["state"] == "running"
    store.finish("t", "key:l1", 7)
    dup = store.begin("t", "key:l1", worker="w2", status=jobs.due("jl1", "running"))
    assert (dup.state, dup.result, dup.status_sent) == (MarkState.DONE, 7, False)
    assert store._on_line(("EVALSHA", "0" * 40, 0)) is None  # not loaded: the client's way
    [cid] = [c["id"] for c in state_redis.client_list() if c.get("name") == name]
    state_redis.client_kill_filter(_id=cid)
    state_redis.delete("tidegate:idem:t:key:l2", "tidegate:idem-run:t:key:l2")
    again = store.begin("t", "key:l2", worker="w1", status=jobs.due("jl2", "running"))
    assert (again.state, again.leased) == (MarkState.NEW, True)  # through the client
    assert store.begin("t", "key:l2", worker="w2").state is MarkState.STARTED
    store.close()
