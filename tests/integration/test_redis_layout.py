"""``tidegate migrate``: a broker written with the old ":" separator, moved to kombu's layout."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import redis

from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL
from tests.support.procs import BIN
from workers.redis_layout import migrate
from workers.topology import REDIS_SEP, redis_priority_lists

pytestmark = pytest.mark.integration


def _message(n: int) -> str:
    return json.dumps({"body": "", "headers": {"n": n}, "properties": {"priority": 3}})


@pytest.fixture
def old_broker(redis_up) -> redis.Redis:
    client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
    client.flushdb()
    # what the old version left: priority lists "q:N" and bindings joined with ":"
    client.lpush("search:3", _message(1), _message(2))  # 1 is the oldest (kombu LPUSHes)
    client.lpush("search:9", _message(3))
    client.sadd("_kombu.binding.search", "search::search")
    client.sadd("_kombu.binding.celery.pidbox", "::w1@host.celery.pidbox")
    client.sadd("_kombu.binding.odd", "a:b:c:d")  # cannot be read either way: dropped
    # what new code published meanwhile: newer than everything above
    client.lpush(f"search{REDIS_SEP}3", _message(4))
    return client


def _order(client: redis.Redis, key: str) -> list[int]:
    """Messages in the order they will be popped (from the right)."""
    return [json.loads(m)["headers"]["n"] for m in reversed(client.lrange(key, 0, -1))]


def test_migrate_moves_lists_oldest_first_and_rewrites_bindings(old_broker):
    dry = migrate(old_broker, ["search", "search.dlq"], dry_run=True)
    assert dry.moved == {"search:3": 2, "search:9": 1} and dry.bindings_rewritten == 2
    assert old_broker.llen("search:3") == 2  # a dry run changes nothing

    report = migrate(old_broker, ["search", "search.dlq"])
    assert report.moved == {"search:3": 2, "search:9": 1}
    assert report.bindings_rewritten == 2 and len(report.bindings_dropped) == 1
    _, p3, _, p9 = redis_priority_lists("search")
    assert _order(old_broker, p3) == [1, 2, 4]  # the old ones first, in their order
    assert _order(old_broker, p9) == [3]
    assert not old_broker.exists("search:3", "search:9")
    assert old_broker.smembers("_kombu.binding.search") == {
        REDIS_SEP.join(["search", "", "search"]).encode()}
    assert old_broker.smembers("_kombu.binding.celery.pidbox") == {
        REDIS_SEP.join(["", "", "w1@host.celery.pidbox"]).encode()}
    assert not old_broker.exists("_kombu.binding.odd")
    assert not migrate(old_broker, ["search"]).changed  # a second run finds nothing


def test_migrate_command(old_broker, policy_file):
    env = {**os.environ, "TIDEGATE_BROKER_URL": REDIS_BROKER_URL,
           "TIDEGATE_REDIS_URL": STATE_REDIS_URL, "TIDEGATE_POLICY_FILE": str(policy_file)}
    run = subprocess.run([str(BIN / "tidegate"), "migrate"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "moved 2 messages from 'search:3'" in run.stdout
    assert "rewrote 2 bindings" in run.stdout
    again = subprocess.run([str(BIN / "tidegate"), "migrate"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert again.stdout.startswith("nothing to migrate"), again.stdout
    amqp = subprocess.run([str(BIN / "tidegate"), "migrate"], capture_output=True, text=True,
                          timeout=120, env={**env, "TIDEGATE_BROKER_URL": "amqp://h//"})
    assert amqp.returncode == 2 and amqp.stderr.count("\n") == 1, amqp.stderr
