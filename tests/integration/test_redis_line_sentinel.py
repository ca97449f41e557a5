"""``ReplyLater`` on a client found through Sentinel writes to the master the sentinels name.

redis-py's ``send_packed_command`` connects a closed connection itself, and for a
Sentinel-managed connection that skips the master lookup: it opened ``localhost:6379``. The
worker's done marks, leases and job statuses then went to whatever Redis listened there (the
Sentinel drill's keyed charges found an earlier run's done marks and were acked unrun)."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from resilience.stores import redis_client
from tests.support.sentinel import SentinelGroup
from tidegate.stack import wait_until
from workers.redis_line import ReplyLater

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _on_default_server(key: str) -> bool:
    """Whether ``key`` reached localhost:6379 db 1 (where the lazy connect went)."""
    try:
        return bool(redis.Redis(port=6379, db=1, socket_timeout=2,
                                socket_connect_timeout=2).exists(key))
    except redis.ConnectionError:
        return False


def test_writes_go_to_the_master_the_sentinels_name(sentinel_group: SentinelGroup) -> None:
    g = sentinel_group
    client = redis_client(g.state_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    master = redis.Redis(port=g.master_port(), db=1, socket_timeout=2)
    assert g.master_port() != 6379
    name = f"tidegate-test-{uuid.uuid4().hex[:8]}"
    line = ReplyLater(client, max_unread=4, name=name)
    run = uuid.uuid4().hex
    keys = [f"rl-sentinel:{run}:{i}" for i in range(3)]
    try:
        line.send("SET", keys[0], "a", "PX", 60_000)
        line.send_many(("SET", keys[1], "b", "PX", 60_000), ("INCR", f"rl-sentinel:{run}:n"))
        # the line's connection broken: the resend must look the master up again too
        ids = [c["id"] for c in master.client_list() if c.get("name") == name]
        assert ids, "the line's connection is not on the master"
        for cid in ids:
            master.client_kill_filter(_id=cid)
        line.send("SET", keys[2], "c", "PX", 60_000)
        line.flush()
        # a round trip as a thread's first use of its line (a non-idempotent task's mark
        # script) opens the connection itself: on the master too
        replies: list = []
        first = threading.Thread(target=lambda: replies.extend(
            line.call(("GET", keys[0]), ("EXISTS", keys[1]))))
        first.start()
        first.join(10)
        assert replies == [b"a", 1]
        wait_until(lambda: master.get(keys[2]) == b"c", 10, message="the write after the kill")
        assert [master.get(k) for k in keys] == [b"a", b"b", b"c"]
        assert not any(_on_default_server(k) for k in keys)
    finally:
        line.close()
