"""A late ack on a channel whose connection was released is a recoverable connection error.

Stock kombu raises AttributeError there ('NoneType' object has no attribute 'hostname'), which
Celery treats as unrecoverable: the worker exited after a broker restart (found by the Redis
restart drill, tests/drills/test_broker_restart.py).
"""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from workers.transport import Channel


class _Released:
    client = None  # what Celery leaves behind when it releases the lost connection


@pytest.mark.parametrize("connection", [None, _Released()])
def test_connparams_on_a_released_connection_is_a_connection_error(connection):
    channel = Channel.__new__(Channel)  # no broker needed: only the guard is under test
    channel.connection = connection
    with pytest.raises(RedisConnectionError, match="connection is closed"):
        channel._connparams()


@pytest.mark.parametrize("connection", [None, _Released()])
def test_conn_or_acquire_on_a_released_connection_is_a_connection_error(connection):
    channel = Channel.__new__(Channel)
    channel.connection = connection
    channel._shared_client = None
    with pytest.raises(RedisConnectionError, match="connection is closed"), \
            channel.conn_or_acquire():
        pass


def test_conn_or_acquire_shares_one_client_per_pool():
    class Client:
        def __init__(self, pool: object) -> None:
            self.connection_pool = pool

    channel = Channel.__new__(Channel)
    channel._shared_client = None
    made: list[Client] = []
    channel._create_client = lambda: made.append(Client(channel._pool)) or made[-1]  # type: ignore
    channel._pool = object()
    with channel.conn_or_acquire() as a, channel.conn_or_acquire() as b:
        assert a is b and len(made) == 1
    channel._pool = object()  # after a disconnect or a fork: a new pool, a new client
    with channel.conn_or_acquire() as c:
        assert c is not a and c.connection_pool is channel._pool and len(made) == 2
    explicit = object()
    with channel.conn_or_acquire(explicit) as d:
        assert d is explicit and len(made) == 2
