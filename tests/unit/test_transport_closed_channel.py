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
