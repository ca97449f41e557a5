"""Settings and topology: bad values become one clear error naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from resilience.errors import ConfigError
from resilience.shedding import Priority
from workers.settings import DEFAULT_POLICY_FILE, load_settings
from workers.topology import broker_priority, load_topology


def test_defaults_are_bounded():
    s = load_settings()
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert 0 < s.connect_timeout_s <= 60 and 0 < s.read_timeout_s <= 300
    assert s.task_soft_time_limit_s < s.task_hard_time_limit_s < s.visibility_timeout_s
    # a dead worker's tasks back within 30 s: TTL + one sweep (Redis), the timeout (SQS)
    assert s.worker_heartbeat_ttl_s + s.orphan_sweep_s < 30 and s.sqs_visibility_timeout_s < 30


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"broker_url": "kafka://x"}, "TIDEGATE_BROKER_URL"),
        ({"redis_url": "http://x"}, "TIDEGATE_REDIS_URL"),
        ({"connect_timeout_s": 0}, "TIDEGATE_CONNECT_TIMEOUT_S"),
        ({"read_timeout_s": -1}, "TIDEGATE_READ_TIMEOUT_S"),
        ({"policy_file": "/nonexistent/policy.toml"}, "TIDEGATE_POLICY_FILE"),
        ({"visibility_timeout_s": 10, "task_hard_time_limit_s": 20,
          "task_soft_time_limit_s": 5}, "TIDEGATE_VISIBILITY_TIMEOUT_S"),
        ({"worker_heartbeat_s": 5, "worker_heartbeat_ttl_s": 8},
         "TIDEGATE_WORKER_HEARTBEAT_TTL_S"),
        ({"orphan_sweep_s": 0}, "TIDEGATE_ORPHAN_SWEEP_S"),
        ({"sqs_visibility_timeout_s": 6}, "TIDEGATE_SQS_VISIBILITY_TIMEOUT_S"),
    ],
)
def test_bad_setting_names_the_variable(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


def test_bad_setting_from_environment(monkeypatch):
    monkeypatch.setenv("TIDEGATE_READ_TIMEOUT_S", "forever")
    with pytest.raises(ConfigError, match="TIDEGATE_READ_TIMEOUT_S"):
        load_settings()


def test_tokens_are_secret_and_split(monkeypatch):
    monkeypatch.setenv("TIDEGATE_API_TOKENS", " a1, b2 ,,")
    s = load_settings()
    assert s.tokens() == {"a1", "b2"}
    assert "a1" not in repr(s) and "a1" not in str(s.model_dump())


@pytest.mark.parametrize(("url", "transport"), [
    ("redis://h/0", "redis"), ("rediss://h/0", "redis"), ("amqp://h//", "amqp"),
    ("pyamqp://h//", "amqp"), ("sqs://", "sqs"),
])
def test_transport_family(url, transport):
    assert load_settings(broker_url=url).transport == transport


def test_default_topology_one_queue_per_dependency():
    topo = load_topology(DEFAULT_POLICY_FILE)
    assert topo.work_queues == ("payments", "search", "email", "default")
    assert topo.queue_for_task("payments.charge") == "payments"
    assert topo.queue_for_task("search.index") == "search"
    assert topo.queue_for_task("reports.build") == "default"
    assert topo.dead_letter_queue("email") == "email.dlq"
    assert topo.dependency_for_queue("payments").name == "payments"  # not pricing
    args = {q.name: q.queue_arguments for q in topo.kombu_queues()}
    assert args["payments"]["x-dead-letter-routing-key"] == "payments.dlq"
    assert {q.name for q in topo.dead_letter_kombu_queues()} == {
        "payments.dlq", "search.dlq", "email.dlq", "default.dlq"}


def test_unknown_queue_and_dependency():
    topo = load_topology(DEFAULT_POLICY_FILE)
    with pytest.raises(ConfigError, match="unknown queue 'nope'"):
        topo.check_queue("nope")
    with pytest.raises(ConfigError, match="unknown dependency"):
        topo.dependency("nope")


@pytest.mark.parametrize(("text", "message"), [
    ("not toml [", "TIDEGATE_POLICY_FILE"),
    ("[other]\nx = 1\n", "no \\[dependencies.NAME\\]"),
    ('[dependencies.a]\nurl = "ftp://x"\n', "dependencies.a.url"),
    ('[dependencies.a]\nurl = "http://x"\ntasks = "a.*"\n', "dependencies.a.tasks"),
])
def test_bad_policy_file(tmp_path: Path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_topology(path)


def test_priorities_per_transport():
    """CRITICAL is consumed first on both brokers, whose number orders are opposite."""
    order = [Priority.CRITICAL, Priority.HIGH, Priority.MEDIUM, Priority.LOW]
    redis = [broker_priority(p, "redis") for p in order]
    amqp = [broker_priority(p, "amqp") for p in order]
    assert redis == sorted(redis) and amqp == sorted(amqp, reverse=True)
    assert broker_priority(Priority.LOW, "sqs") is None


def test_priority_of_a_plain_message_reads_each_brokers_scale():
    """A bare send_task carries only a number: kombu's Redis steps, RabbitMQ's inverse."""
    from resilience.shedding import Priority
    from workers.topology import broker_priority, priority_from_broker

    for p in Priority:
        for transport in ("redis", "amqp"):
            assert priority_from_broker(broker_priority(p, transport), transport) is p
    assert [priority_from_broker(n, "redis") for n in (0, 2, 3, 5, 6, 8, 9)] == [
        Priority.CRITICAL, Priority.CRITICAL, Priority.HIGH, Priority.HIGH, Priority.MEDIUM,
        Priority.MEDIUM, Priority.LOW]
    assert priority_from_broker(None, "redis") is None
    assert priority_from_broker(True, "amqp") is None
    assert priority_from_broker(3, "sqs") is None


def test_a_rabbitmq_failover_list_is_one_broker():
    """``amqp://h1/vh;amqp://h2/vh``: kombu tries the nodes in turn; the depth probe reads the
    vhost and login of the first (docs/ha.md, RabbitMQ quorum queues)."""
    from workers.depth import RabbitMQDepthProbe

    url = "amqp://u:p@127.0.0.1:5681/vh;amqp://u:p@127.0.0.1:5682/vh"
    assert load_settings(broker_url=url).transport == "amqp"
    probe = RabbitMQDepthProbe(url)
    assert (probe.vhost, probe._auth) == ("vh", ("u", "p"))
