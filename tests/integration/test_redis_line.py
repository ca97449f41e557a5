"""``ReplyLater`` on a real Redis: writes land, replies are read later, a broken connection
loses nothing, an unreachable server is a clear error."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
import redis

from resilience.stores import redis_client
from tests.conftest import STATE_REDIS_URL
from tidegate.stack import free_port, wait_until
from workers.redis_line import ReplyLater, ReplyLaterError


@pytest.fixture
def line_name() -> str:
    return f"tidegate-test-{uuid.uuid4().hex[:8]}"  # xdist workers must not kill each other's


def client_ids(r: redis.Redis, name: str) -> list[int]:
    return [c["id"] for c in r.client_list() if c.get("name") == name]


def test_writes_land_and_replies_are_read_in_batches(state_redis: redis.Redis,
                                                     line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), max_unread=8,
                      name=line_name)
    for i in range(20):
        line.send("SET", f"rl:{i}", str(i), "PX", 60_000)
        assert line.unread() <= 8  # read when 8 piled up, never more
    assert line.unread() > 0  # the last ones are not waited for
    wait_until(lambda: state_redis.get("rl:19") == b"19", 5, message="the last write")
    assert [state_redis.get(f"rl:{i}") for i in range(20)] == [str(i).encode()
                                                               for i in range(20)]
    line.flush()
    assert line.unread() == 0
    line.close()
    assert client_ids(state_redis, line_name) == []


def test_send_many_writes_several_commands_at_once(state_redis: redis.Redis,
                                                  line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), max_unread=4,
                      name=line_name)
    line.send("SET", "rl:gone", "x", "PX", 60_000)
    for i in range(3):  # 1 + 3 commands at a time: the replies owed are read first
        line.send_many(("SET", f"rl:m{i}", "a", "PX", 60_000), ("DEL", "rl:gone"),
                       ("SET", f"rl:n{i}", "b", "PX", 60_000))
        assert line.unread() <= 4
    wait_until(lambda: state_redis.get("rl:n2") == b"b", 5, message="the last write")
    assert state_redis.exists("rl:gone") == 0
    assert all(state_redis.get(f"rl:m{i}") == b"a" for i in range(3))
    line.close()


def test_each_thread_has_its_own_connection(state_redis: redis.Redis, line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), name=line_name)

    def work(n: int) -> None:
        for i in range(50):
            line.send("SET", f"rl:t{n}:{i}", "x", "PX", 60_000)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(client_ids(state_redis, line_name)) == 4
    wait_until(lambda: all(state_redis.exists(f"rl:t{n}:49") for n in range(4)), 5,
               message="every thread's last write")
    assert sum(1 for _ in state_redis.scan_iter("rl:t*", count=500)) == 200
    line.close()


def test_an_error_reply_is_logged_and_later_writes_go_on(state_redis: redis.Redis,
                                                         line_name: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), max_unread=2,
                      name=line_name)
    state_redis.set("rl:text", "not a number")
    with caplog.at_level(logging.WARNING, logger="tidegate.redis"):
        line.send("INCR", "rl:text")  # refused by Redis: WRONGTYPE/not an integer
        line.send("SET", "rl:after", "1")
        line.flush()
    assert "Redis refused INCR rl:text" in caplog.text
    assert state_redis.get("rl:after") == b"1"
    line.close()


def test_a_killed_connection_is_reopened_and_unanswered_writes_are_sent_again(
        state_redis: redis.Redis, line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), max_unread=1000,
                      name=line_name)
    line.send("SET", "rl:before", "1", "PX", 60_000)
    wait_until(lambda: state_redis.get("rl:before") == b"1", 5, message="first write")
    [cid] = client_ids(state_redis, line_name)
    state_redis.client_kill_filter(_id=cid)
    # The first send after the kill may still "succeed" into the dead socket; the lost
    # write is found when the replies are read, and sent again on a new connection.
    for i in range(5):
        line.send("SET", f"rl:k{i}", str(i), "PX", 60_000)
    line.flush()
    assert line.unread() == 0
    assert [state_redis.get(f"rl:k{i}") for i in range(5)] == [str(i).encode() for i in range(5)]
    [new_id] = client_ids(state_redis, line_name)
    assert new_id != cid
    line.close()


def test_an_unreachable_server_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    line = ReplyLater(redis_client(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5,
                                   socket_connect_timeout=0.5))
    with pytest.raises(ReplyLaterError, match="may not be stored"):
        line.send("SET", "k", "v")
    assert line.unread() == 0


def test_a_call_is_answered_after_the_writes_before_it(state_redis: redis.Redis,
                                                       line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), name=line_name)
    state_redis.set("rl:c:text", "not a number")
    line.send("SET", "rl:c:a", "1", "PX", 60_000)
    line.send("INCR", "rl:c:text")  # refused: logged when read, not the call's reply
    got, gone, refused = line.call(("GET", "rl:c:a"), ("DEL", "rl:c:none"),
                                   ("INCR", "rl:c:text"))
    assert (got, gone) == (b"1", 0)  # the write before it landed first, on the same line
    assert isinstance(refused, redis.exceptions.ResponseError)  # returned, not raised
    assert line.unread() == 0  # the earlier writes' replies were read on the way
    assert len(client_ids(state_redis, line_name)) == 1  # this thread's line, no other
    line.close()


def test_a_call_on_a_broken_connection_raises_and_the_line_goes_on(state_redis: redis.Redis,
                                                                   line_name: str) -> None:
    line = ReplyLater(redis_client(STATE_REDIS_URL, socket_timeout=2.0), name=line_name)
    line.send("SET", "rl:b:before", "1", "PX", 60_000)
    line.flush()
    [cid] = client_ids(state_redis, line_name)
    state_redis.client_kill_filter(_id=cid)
    line.send("SET", "rl:b:unanswered", "1", "PX", 60_000)  # may go into the dead socket
    with pytest.raises(ReplyLaterError, match="not answered"):
        line.call(("GET", "rl:b:before"))
    assert line.call(("GET", "rl:b:before")) == [b"1"]  # a new connection
    # the write that was unanswered when the connection broke was sent again
    wait_until(lambda: state_redis.get("rl:b:unanswered") == b"1", 5, message="resent write")
    line.close()
