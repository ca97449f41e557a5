"""A real worker reports to the cluster: its dead letters in the shared counters, its task
durations in the processing-time lists that the desired-workers figure reads."""

from __future__ import annotations

import pytest

from tests.support.procs import wait_until
from workers.autoscale import ProcessingTimes
from workers.cluster_metrics import read_cluster_counters

pytestmark = pytest.mark.integration


def _dead_letters(state_redis, queue: str) -> float:
    rows = read_cluster_counters(state_redis).get("tidegate_cluster_dead_letters", [])
    return sum(total for labels, total in rows if labels.get("queue") == queue)


# The reporting path does not depend on the broker: Redis covers it.
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_worker_mirrors_dead_letters_and_processing_times(broker, sims, producer, start_worker,
                                                          state_redis):
    start_worker("payments,search")
    sims["payments"].control(mode="failing", error_rate=1.0)
    producer.enqueue("payments.charge", ["acct-x", 100])  # not idempotent, no key: dead-letter
    for i in range(3):
        producer.enqueue("search.index", [f"doc-{i}"])

    # The mirror flushes every 5 s; a dead letter shows up in the cluster-wide total.
    wait_until(lambda: _dead_letters(state_redis, "payments") >= 1, 60, interval=0.5,
               message="the dead letter in the cluster counters")
    times = ProcessingTimes(state_redis)
    # one duration per task, recorded as each finishes: wait for all three, not the first
    wait_until(lambda: state_redis.llen(times.key("search")) >= 3, 30, interval=0.2,
               message="3 search processing times recorded")
    assert times.mean("search") > 0
