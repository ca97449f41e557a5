"""What feeds the exporter from other processes: cluster counters and task processing times."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter

from tests.conftest import STATE_REDIS_URL
from tidegate.stack import wait_until
from workers.autoscale import ProcessingTimes
from workers.cluster_metrics import CounterMirror, read_cluster_counters

pytestmark = pytest.mark.integration


def test_mirror_keeps_increments_while_redis_is_away(state_redis):
    registry = CollectorRegistry()
    retries = Counter("tidegate_retries", "x", ["dependency"], registry=registry)
    down = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    mirror = CounterMirror(down, registry=registry)
    retries.labels(dependency="search").inc(3)
    with pytest.raises(redis.ConnectionError):
        mirror.flush()
    retries.labels(dependency="search").inc(2)
    mirror.client = state_redis  # Redis is back: nothing counted while it was away is lost
    assert mirror.flush() == 1
    assert read_cluster_counters(state_redis) == {
        "tidegate_cluster_retries": [({"dependency": "search"}, 5.0)]}
    mirror.start()
    retries.labels(dependency="search").inc()
    mirror.stop()  # the final flush sends the last increment
    assert read_cluster_counters(state_redis)["tidegate_cluster_retries"][0][1] == 6.0


def test_worker_signals_record_processing_time_per_queue(state_redis, policy_file):
    from celery import signals

    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url="memory://", redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file))
    other = create_app(load_settings(broker_url="memory://", redis_url=STATE_REDIS_URL,
                                     policy_file=policy_file))
    app.loader.import_default_modules()
    other.loader.import_default_modules()
    times = ProcessingTimes(state_redis)
    # create_app installs the recorder on every app: each records its own tasks, once.
    for a, task_id in ((app, "t1"), (other, "t2")):
        task = a.tasks["search.index"]
        task.push_request(delivery_info={"routing_key": "search"})
        try:
            signals.task_prerun.send(sender=task, task_id=task_id, task=task)
            signals.task_postrun.send(sender=task, task_id=task_id, task=task)
        finally:
            task.pop_request()
    # buffered, then written by a timer within a second
    wait_until(lambda: state_redis.llen(times.key("search")) >= 2, 10, interval=0.1,
               message="both processing times written")
    assert state_redis.llen(times.key("search")) == 2  # one per task, not one per app
    assert 0 <= times.mean("search") < 5
    assert times.mean("payments") is None
    app.close()
    other.close()


def test_processing_times_are_buffered_and_written_together(state_redis):
    times = ProcessingTimes(state_redis, keep=30, flush_s=60.0)
    for i in range(50):
        times.observe("search", i / 1000)
    assert state_redis.llen(times.key("search")) == 0  # nothing written per task
    times.flush()
    values = [float(v) for v in state_redis.lrange(times.key("search"), 0, -1)]
    assert values == [i / 1000 for i in range(49, 19, -1)]  # the newest 30, newest first
    assert 0 < state_redis.ttl(times.key("search")) <= 3600

    quick = ProcessingTimes(state_redis, flush_s=0.2)
    quick.observe("payments", 0.5)
    wait_until(lambda: quick.mean("payments") == 0.5, 10, interval=0.05,
               message="the timer's write")
