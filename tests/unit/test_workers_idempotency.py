"""``IdempotencyStore.begin``: one ``SET NX GET`` where Redis has it, else the script."""

from __future__ import annotations

import json

import pytest
import redis

from workers.idempotency import IdempotencyStore, MarkState


class OldRedis:
    """Redis < 7.0 as redis-py sees it: SET refuses NX with GET; scripts work."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.set_calls = 0

    def set(self, name: str, value: str, **kwargs: object) -> object:
        self.set_calls += 1
        if kwargs.get("nx") and kwargs.get("get"):
            raise redis.exceptions.ResponseError("ERR syntax error")
        self.data[name] = value
        return True

    def register_script(self, _source: str):
        def begin(keys: list[str], args: list[object]) -> str | None:
            if keys[0] in self.data:
                return self.data[keys[0]]
            self.data[keys[0]] = str(args[0])
            return None
        return begin


def test_begin_falls_back_to_the_script_once_on_a_server_without_set_nx_get() -> None:
    client = OldRedis()
    store = IdempotencyStore(client, ttl_s=60)
    assert store.begin("t", "task:1", worker="w").state is MarkState.NEW
    assert store.begin("t", "task:1", worker="w").state is MarkState.STARTED
    assert client.set_calls == 1  # asked once, then the script only
    store.finish("t", "task:1", 7)
    mark = store.begin("t", "task:1")
    assert (mark.state, mark.result) == (MarkState.DONE, 7)


def test_begin_does_not_mistake_another_error_for_an_old_server() -> None:
    class Failing(OldRedis):
        def set(self, name: str, value: str, **kwargs: object) -> object:
            raise redis.exceptions.ResponseError("OOM command not allowed")

    store = IdempotencyStore(Failing(), ttl_s=60)
    with pytest.raises(Exception, match="idempotency store unreachable"):
        store.begin("t", "task:1")
    assert store._set_nx_get


def test_a_started_record_keeps_its_format() -> None:
    client = OldRedis()
    IdempotencyStore(client, ttl_s=60).begin("t", "key:k", worker="w1")
    doc = json.loads(client.data["tidegate:idem:t:key:k"])
    assert doc["s"] == "started" and doc["w"] == "w1" and isinstance(doc["t"], float)
