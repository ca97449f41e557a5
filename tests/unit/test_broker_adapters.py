"""One adapter per broker (workers/brokers/): the registry picks it from the URL's scheme, and
no code outside the adapters branches on a transport name (docs/architecture.md, "Broker
adapters"). resilience/ importing no framework is tests/unit/test_resilience_imports.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from resilience.errors import ConfigError
from resilience.shedding import Priority
from tidegate.stack import ROOT
from workers.brokers import BROKERS, SCHEMES, BrokerAdapter, broker_for
from workers.settings import load_settings

PACKAGES = ("workers", "producers", "tidegate", "resilience")
# Branches on a transport name that remain, by file (each a count): none may be added.
ALLOWED: dict[str, int] = {}


def _is_transport(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "transport")
            or (isinstance(node, ast.Name) and node.id == "transport"))


def transport_branches(path: Path) -> int:
    """Comparisons of a ``transport`` (name or attribute) with anything: ``==``, ``in``, ..."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(
                _is_transport(n) for n in (node.left, *node.comparators)):
            count += 1
    return count


def test_no_transport_branch_outside_the_adapters():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("workers/brokers/"):
                continue
            if (n := transport_branches(path)) > 0:
                found[rel] = n
    assert found == ALLOWED


@pytest.mark.parametrize(("url", "name"), [
    ("redis://127.0.0.1:6379/0", "redis"), ("rediss://h:6380/0", "redis"),
    ("redis+socket:///tmp/r.sock", "redis"), ("sentinel://h:26379/0?master_name=m", "redis"),
    ("amqp://guest@h//", "amqp"), ("amqps://h//", "amqp"), ("pyamqp://h//", "amqp"),
    ("sqs://", "sqs"), ("memory://", "memory"),
])
def test_the_registry_picks_the_adapter_by_scheme(url, name):
    assert broker_for(url).name == name
    assert broker_for(url) is BROKERS[name]


def test_an_unknown_scheme_is_one_clear_error():
    with pytest.raises(ConfigError, match="unsupported broker scheme 'kafka'"):
        broker_for("kafka://h:9092")
    with pytest.raises(Exception, match="unsupported scheme 'kafka'"):
        load_settings(broker_url="kafka://h:9092")


def test_every_adapter_is_complete_and_its_schemes_are_its_own():
    seen: set[str] = set()
    for name, adapter in BROKERS.items():
        assert isinstance(adapter, BrokerAdapter) and adapter.name == name
        assert not seen & set(adapter.schemes)
        seen |= set(adapter.schemes)
        if adapter.priorities is not None:  # every priority has a number, read back the same
            assert set(adapter.priorities) == set(Priority)
            for p in Priority:
                assert adapter.priority_from(adapter.priority(p)) is p
    assert seen == SCHEMES


def test_every_batch_mechanism_an_adapter_names_exists():
    from producers.producer import _BATCH_MECHANISMS, Producer

    for adapter in BROKERS.values():
        if adapter.batch_publish is not None:
            assert callable(getattr(Producer, _BATCH_MECHANISMS[adapter.batch_publish]))


def test_what_differs_per_broker():
    redis, amqp, sqs = (BROKERS[n] for n in ("redis", "amqp", "sqs"))
    assert (redis.flags_redelivery, amqp.flags_redelivery, sqs.flags_redelivery) == (
        True, True, False)
    assert [b.dead_letters_natively for b in (redis, amqp, sqs)] == [False, True, False]
    assert sqs.priority(Priority.CRITICAL) is None
    # CRITICAL jumps the queue on both: Redis pops 0 first, RabbitMQ delivers 9 first
    assert (redis.priority(Priority.CRITICAL), amqp.priority(Priority.CRITICAL)) == (0, 9)
    settings = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert amqp.publish_options(settings)["mandatory"] is True
    assert redis.publish_options(settings) == {} == sqs.publish_options(settings)


def test_direct_clients_are_bounded_and_only_where_tidegate_reads_the_broker_itself():
    settings = load_settings(broker_url="redis://127.0.0.1:6379/0")
    client = BROKERS["redis"].client(settings, timeout_s=0.5)  # no connection made yet
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.5)
    assert BROKERS["redis"].client(settings).connection_pool.connection_kwargs[
        "socket_timeout"] == settings.read_timeout_s
    with pytest.raises(ConfigError, match="no direct client"):
        BROKERS["amqp"].client(settings)


def test_which_publish_errors_are_the_broker_refusing():
    from amqp.exceptions import ChannelError, NotFound

    redis, amqp, sqs = (BROKERS[n] for n in ("redis", "amqp", "sqs"))
    no_route = ChannelError("NO_ROUTE", reply_code=312)
    assert amqp.unroutable(no_route) and amqp.refused_publish(no_route)
    assert amqp.refused_publish(NotFound("no exchange")) and not amqp.unroutable(NotFound("x"))
    assert not amqp.refused_publish(ValueError("a bug"))
    assert not redis.unroutable(no_route) and not sqs.refused_publish(ValueError("a bug"))


def test_a_new_broker_is_one_adapter_and_one_registry_entry(monkeypatch):
    """What docs/architecture.md's "Adding a broker" promises: the settings accept its scheme
    and every component asks it (here the probe and the priorities), nothing else edited."""
    import workers.brokers as brokers
    from workers.depth import QueueDepth, probe_for
    from workers.topology import broker_priority

    class FakeProbe:
        def depth(self, queue: str) -> QueueDepth:
            return QueueDepth(queue, 7, 0, None, None, None, "fake", 0.0)

    class FakeBroker(BrokerAdapter):
        name = "fake"
        schemes = ("fake",)
        priorities = {Priority.CRITICAL: 1, Priority.HIGH: 4, Priority.MEDIUM: 7,
                      Priority.LOW: 9}

        def depth_probe(self, settings):
            return FakeProbe()

    adapter = FakeBroker()
    monkeypatch.setitem(brokers.BROKERS, "fake", adapter)
    monkeypatch.setitem(brokers._BY_SCHEME, "fake", adapter)
    monkeypatch.setattr(brokers, "SCHEMES", brokers.SCHEMES | {"fake"})
    settings = load_settings(broker_url="fake://somewhere/")
    assert settings.transport == "fake"
    assert probe_for(settings).depth("search").ready == 7
    assert broker_priority(Priority.MEDIUM, settings.transport) == 7
    assert adapter.priority_from(8) is Priority.MEDIUM  # its own scale, read back
    assert (adapter.flags_redelivery, adapter.publish_options(settings)) == (False, {})
