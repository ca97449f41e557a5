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
