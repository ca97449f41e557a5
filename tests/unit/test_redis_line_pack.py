"""``workers.redis_line.pack``: byte for byte redis-py's packing, or None where redis-py's
own packer must do it."""

from __future__ import annotations

import redis

from workers.redis_line import pack


def redis_py(commands: tuple[tuple[object, ...], ...]) -> bytes:
    conn = redis.Connection()  # never connected: only its packer is used
    return b"".join(conn.pack_commands(commands))


def test_the_bytes_are_redis_pys() -> None:
    commands = (
        ("SET", "tidegate:idem:t:task:1", '{"s": "done", "r": "\u00e9"}', "PX", 604800000),
        ("DEL", b"raw\xffkey"), ("SELECT", 8), ("ZADD", "z", 1.5, "m"),
        ("SET", "big", "x" * 20_000),  # over redis-py's 6 KB chunk size: still the same bytes
        ("INCRBY", "n", -3), ("SET", "empty", ""),
    )
    assert pack(commands) == redis_py(commands)
    latin = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"
    assert pack((("SET", "k", "\u00e9"),), "latin-1") == latin  # the connection's encoding


def test_what_it_does_not_take_is_left_to_redis_py() -> None:
    assert pack((("SET", "k", True),)) is None  # redis-py refuses bools
    assert pack((("SET", "k", None),)) is None
    assert pack((("SET", "k", memoryview(b"v")),)) is None
    assert pack((("CONFIG GET", "maxmemory"),)) is None  # redis-py splits the name
    assert pack((("SET", "k", "v"), (b"GET", "k"))) is None
