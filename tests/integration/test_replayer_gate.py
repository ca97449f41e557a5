"""The replayer's decisions, step by step, against real Redis (breaker, broker) and moto SQS."""

from __future__ import annotations

import json

import pytest
import redis

from resilience.fallback import DeferredRequest
from resilience.policy import PolicyConfig
from resilience.stores import RedisStore, redis_client
from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL
from tests.support.procs import wait_until
from workers.installation import installation
from workers.sqs_deferral import encode_entry
from workers.topology import redis_priority_lists

pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("broker", ["redis"], indirect=True)]


def _depth() -> int:
    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    return sum(client.llen(k) for k in redis_priority_lists("email"))


@pytest.fixture
def rig(broker, sims, policy_file, moto_sqs, deferral_prefix, state_redis):
    """A Celery app, the email deferral store, the shared breaker store and a replayer."""
    from workers.application import create_app
    from workers.replayer import ReplayConfig, build_replayer
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file, sqs_endpoint_url=moto_sqs.url,
                             aws_access_key_id="testing", aws_secret_access_key="testing",
                             deferral_queue_prefix=deferral_prefix,
                             deferral_max_receive_count=2)
    app = create_app(settings)
    store = RedisStore(redis_client(STATE_REDIS_URL, socket_timeout=1,
                                    socket_connect_timeout=1))
    cfg = ReplayConfig(visibility_timeout_s=1, start_rate=1000.0, idle_wait_s=0,
                       probe_interval_s=0.01, max_queue_depth=1000)
    replayer = build_replayer(app, "email", cfg, state_store=store)
    topo = installation(app).topology.dependency("email")
    breaker_cfg = PolicyConfig.from_mapping("email", topo.policy).breaker

    class Rig:
        pass

    rig = Rig()
    rig.app, rig.replayer, rig.sink = app, replayer, replayer.store
    rig.force = lambda state, d=60.0: store.breaker_force("email", breaker_cfg, state, d)
    rig.sims = sims
    yield rig
    app.close()


def _defer(sink, n: int, tag: str = "g") -> None:
    for i in range(n):
        sink.defer(DeferredRequest("email", "email.send", (f"{tag}{i}@x", "s"),
                                   idempotency_key=f"{tag}-{i}"))


def test_open_breaker_or_failing_health_replays_nothing(rig):
    _defer(rig.sink, 12)
    rig.force("open")
    assert rig.replayer.step(long_poll=False)[0] == "down"
    rig.force("closed")
    rig.sims["email"].control(mode="down")  # breaker closed, but /health answers 503
    assert rig.replayer.step(long_poll=False)[0] == "down"
    assert _depth() == 0 and rig.sink.stats().visible == 12
    assert rig.replayer.stats.received == 0  # not even received: no receive count burnt


def test_half_open_sends_one_trial_then_closed_drains(rig):
    _defer(rig.sink, 25)
    rig.force("half_open")
    assert rig.replayer.step(long_poll=False)[0] == "trial"
    assert _depth() == 1 and rig.sink.stats().total == 24
    rig.force("closed")
    stats = rig.replayer.drain()
    assert stats.published == 25 and stats.deleted == 25
    assert _depth() == 25 and rig.sink.stats().total == 0
    # every replay carries its original key (and a task id derived from it)
    from workers.replayer import replay_task_id

    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    messages = [json.loads(m) for k in redis_priority_lists("email")
                for m in client.lrange(k, 0, -1)]
    keys = {m["headers"]["tidegate_idempotency_key"] for m in messages}
    assert keys == {f"g-{i}" for i in range(25)}
    assert all(m["headers"]["id"] == replay_task_id(m["headers"]["tidegate_idempotency_key"])
               for m in messages)


def test_breaker_opening_midway_stops_the_drain(rig):
    from workers.replayer import DependencyDown

    _defer(rig.sink, 40)
    for _ in range(2):
        assert rig.replayer.step(long_poll=False)[0] == "replayed"
    published = rig.replayer.stats.published
    assert 0 < published < 40
    rig.force("open")
    with pytest.raises(DependencyDown, match="email is not back"):
        rig.replayer.drain()
    assert rig.replayer.stats.published == published == _depth()
    assert rig.sink.stats().total == 40 - published


def test_watermark_holds_back_the_replay(rig):
    from workers.replayer import ReplayConfig

    _defer(rig.sink, 30)
    rig.replayer.cfg = ReplayConfig(max_queue_depth=12, visibility_timeout_s=1,
                                    start_rate=1000.0, idle_wait_s=0)
    outcomes = [rig.replayer.step(long_poll=False)[0] for _ in range(6)]
    assert "full" in outcomes
    assert _depth() == 12 and rig.sink.stats().total == 18


def test_poison_entries_end_in_the_dlq_after_max_receive_count(rig):
    resolved = rig.sink.resolve()
    assert resolved.max_receive_count == 2
    rig.sink.client.send_message(QueueUrl=resolved.url, MessageBody="{not json")
    rig.sink.client.send_message(QueueUrl=resolved.url, MessageBody=encode_entry(
        DeferredRequest("email", "email.no_such_task", (), idempotency_key="p-1")))

    def moved() -> bool:
        rig.replayer.step(long_poll=False)
        return rig.sink.stats().dead == 2

    wait_until(moved, 60, interval=0.2, message="both poison entries in the deferral DLQ")
    assert rig.sink.stats().total == 0
    assert rig.replayer.stats.poison >= 2 and rig.replayer.stats.published == 0
    assert _depth() == 0


def _visible_entries(sink, n: int) -> list:
    """Receive (hidden for 30 s) until n distinct entries were seen."""
    seen: dict[str, object] = {}
    wait_until(lambda: (seen.update((e.message_id, e) for e in sink.receive(
        10, visibility_timeout=30)) or True) and len(seen) >= n, 30, interval=0.05,
               message=f"{n} entries received")
    return list(seen.values())


def test_refresh_stores_each_entry_again_with_its_content(rig):
    from dataclasses import replace as dc_replace

    for i in range(15):
        rig.sink.defer(DeferredRequest("email", "email.send", (f"r{i}@x", "s"),
                                       idempotency_key=f"r-{i}", deferrals=2,
                                       first_deferred_at=1000.0 + i))
    old = _visible_entries(rig.sink, 15)
    poison = dc_replace(old[0], request=None, error="undecodable")  # never copied
    refreshed = rig.sink.refresh([poison, *old[1:]])
    assert len(refreshed) == 14
    new = _visible_entries(rig.sink, 15)
    assert {e.message_id for e in new} & {e.message_id for e in old} == {old[0].message_id}
    by_key = {e.request.idempotency_key: e for e in new}
    assert set(by_key) == {f"r-{i}" for i in range(15)}  # nothing lost, nothing doubled
    for e in new:
        if e.message_id != old[0].message_id:  # copies: a new message with the same content
            assert e.receive_count == 1 and e.request.deferrals == 2
            i = int(e.request.idempotency_key.split("-")[1])
            assert e.request.first_deferred_at == 1000.0 + i
    assert rig.sink.stats().total == 15


def test_while_down_a_due_sweep_refreshes_every_entry_then_the_replay_is_exactly_once(rig):
    from workers.replayer import ReplayConfig

    _defer(rig.sink, 23, tag="s")
    rig.replayer.cfg = ReplayConfig(visibility_timeout_s=1, start_rate=1000.0, idle_wait_s=0,
                                    probe_interval_s=0.01, refresh_every_s=1.0)
    rig.force("open")
    assert rig.replayer.step(long_poll=False)[0] == "down"
    assert rig.replayer.stats.refreshed == 0  # a period starts the first time it is seen
    wait_until(lambda: rig.replayer.step(long_poll=False)[0] == "down"
               and rig.replayer.stats.refreshed > 0, 30, interval=0.2,
               message="a sweep while email is down")
    assert rig.replayer.stats.refreshed == 23 and rig.replayer.stats.published == 0
    assert rig.sink.stats().visible == 23  # the sweep's copies are replayable at once
    rig.force("closed")
    rig.replayer.cfg = ReplayConfig(visibility_timeout_s=1, start_rate=1000.0, idle_wait_s=0,
                                    probe_interval_s=0.01)
    stats = rig.replayer.drain()
    assert stats.published == 23 and rig.sink.stats().total == 0
    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    keys = [json.loads(m)["headers"]["tidegate_idempotency_key"]
            for k in redis_priority_lists("email") for m in client.lrange(k, 0, -1)]
    assert sorted(keys) == sorted(f"s-{i}" for i in range(23))


def test_an_unreachable_sqs_endpoint_while_down_does_not_stop_the_replayer(
        broker, policy_file, state_redis):
    """The sweep's schedule needs the queue's retention, which needs SQS: when the endpoint
    is dead the step reports "down" and the sweep is tried again later, nothing raises."""
    from tidegate.stack import free_port
    from workers.application import create_app
    from workers.replayer import ReplayConfig, build_replayer
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file,
                             sqs_endpoint_url=f"http://127.0.0.1:{free_port()}",
                             aws_access_key_id="testing", aws_secret_access_key="testing",
                             connect_timeout_s=0.2, read_timeout_s=0.5, sqs_max_attempts=1)
    app = create_app(settings)
    store = RedisStore(redis_client(STATE_REDIS_URL, socket_timeout=1,
                                    socket_connect_timeout=1))
    replayer = build_replayer(app, "email", ReplayConfig(probe_interval_s=0.01),
                              state_store=store)
    topo = installation(app).topology.dependency("email")
    store.breaker_force("email", PolicyConfig.from_mapping("email", topo.policy).breaker,
                        "open", 60.0)
    try:
        assert replayer.step(long_poll=False)[0] == "down"
        assert replayer.step(long_poll=False)[0] == "down"
        assert replayer.stats.refreshed == 0
    finally:
        app.close()
