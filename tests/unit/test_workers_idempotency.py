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
        if kwargs.get("nx") and name in self.data:
            return None
        self.data[name] = value
        return True

    def delete(self, *names: str) -> int:
        return sum(self.data.pop(n, None) is not None for n in names)

    def register_script(self, _source: str):
        def begin(keys: list[str], args: list[object], client: object = None) -> object:
            if client is not None and client is not self:  # queued on a pipeline
                return client._queue(lambda: begin(keys, args))
            if keys[0] in self.data:
                return self.data[keys[0]]
            self.data[keys[0]] = str(args[0])
            return None
        return begin

    def pipeline(self, transaction: bool = True) -> Pipe:
        return Pipe(self)


class Pipe:
    """A pipeline of OldRedis: commands queued, run in order by ``execute`` (errors raised)."""

    def __init__(self, client: OldRedis) -> None:
        self.client, self.calls = client, []

    def _queue(self, call) -> Pipe:
        self.calls.append(call)
        return self

    def set(self, *a: object, **k: object) -> Pipe:
        return self._queue(lambda: self.client.set(*a, **k))

    def delete(self, *names: str) -> Pipe:
        return self._queue(lambda: self.client.delete(*names))

    def pexpire(self, name: str, ms: int) -> Pipe:
        return self._queue(lambda: name in self.client.data)

    def execute(self) -> list[object]:
        return [call() for call in self.calls]


def test_begin_falls_back_to_the_script_once_on_a_server_without_set_nx_get() -> None:
    client = OldRedis()
    store = IdempotencyStore(client, ttl_s=60)
    assert store.begin("t", "task:1", worker="w").state is MarkState.NEW
    assert store.begin("t", "task:1", worker="w").state is MarkState.STARTED
    assert client.set_calls == 3  # SET NX GET asked once (then the script), + 2 lease SETs
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
