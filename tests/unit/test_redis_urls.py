"""Redis Cluster URLs: what is accepted, and one clear line for what is not."""

from __future__ import annotations

import pytest

from resilience.errors import ConfigError
from resilience.redis_cluster import LazyCluster, parse_cluster_url
from resilience.stores import redis_client


def test_nodes_and_credentials():
    nodes, kw = parse_cluster_url("redis-cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/0")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert kw == {"ssl": False, "username": "u", "password": "p@ss"}
    assert parse_cluster_url("rediss-cluster://:pw@h:1")[1] == {"ssl": True, "password": "pw"}


@pytest.mark.parametrize(("url", "message"), [
    ("redis-cluster://h:7000/3", "only database 0"),
    ("redis-cluster://h", "must be host:port"),
    ("redis-cluster://h:99999", "must be host:port"),
    ("redis-cluster://", "names no node"),
    ("redis://h:1", "not a Redis Cluster URL"),
])
def test_bad_urls_are_one_line_config_errors(url, message):
    with pytest.raises(ConfigError, match=message) as exc:
        parse_cluster_url(url)
    assert "\n" not in str(exc.value)


def test_redis_client_builds_a_lazy_cluster_client_without_connecting():
    client = redis_client("redis-cluster://127.0.0.1:1", socket_timeout=0.1,
                          socket_connect_timeout=0.1)
    assert isinstance(client, LazyCluster) and client.connection_pool is None


def test_settings_accept_cluster_urls_and_name_the_variable():
    from workers.settings import load_settings

    assert load_settings(redis_url="redis-cluster://h:7000").redis_url == "redis-cluster://h:7000"
    with pytest.raises(ConfigError, match=r"(?i)redis_url") as exc:
        load_settings(redis_url="redis-cluster://h:7000/2")
    assert "only database 0" in str(exc.value)


def test_sentinel_urls_in_kombus_form():
    from resilience.redis_sentinel import parse_sentinel_url

    t = parse_sentinel_url("sentinel://:pw@h1:26379/2;sentinel://h2:26380;"
                           "sentinel://h3?master_name=tidegate")
    assert (t.sentinels, t.master, t.db, t.password) == (
        [("h1", 26379), ("h2", 26380), ("h3", 26379)], "tidegate", 2, "pw")
    assert parse_sentinel_url("sentinel://h1:1").master == "mymaster"


@pytest.mark.parametrize(("url", "message"), [
    ("sentinel://h1:1;redis://h2:2", "must be sentinel://"),
    ("sentinel://h1:1/x", "database must be a number"),
    ("sentinel://h1:notaport", "bad sentinel port"),
    ("sentinel://", "no sentinel host"),
])
def test_bad_sentinel_urls_are_one_line_config_errors(url, message):
    from resilience.redis_sentinel import parse_sentinel_url

    with pytest.raises(ConfigError, match=message) as exc:
        parse_sentinel_url(url)
    assert "\n" not in str(exc.value)


def test_a_sentinel_broker_picks_the_reliable_sentinel_transport_without_the_query():
    from workers.application import broker_transport, transport_options
    from workers.sentinel_transport import SENTINEL_TRANSPORT_PATH, kombu_url
    from workers.settings import load_settings

    url = "sentinel://h1:26379/0;sentinel://h2:26380?master_name=tidegate"
    settings = load_settings(broker_url=url)
    assert settings.transport == "redis"
    assert broker_transport(settings)["broker_transport"] == SENTINEL_TRANSPORT_PATH
    assert transport_options(settings)["master_name"] == "tidegate"
    assert kombu_url(url) == "sentinel://h1:26379/0;sentinel://h2:26380"
