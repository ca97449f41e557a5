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


class Conn:
    """A pooled connection that answers as scripted: CLIENT REPLY SKIP honoured or refused."""

    def __init__(self, server: ReplyServer) -> None:
        self.server = server
        self.pending: list[object] = []

    def pack_commands(self, commands: list[tuple]) -> list[tuple]:
        return commands

    def send_packed_command(self, commands: list[tuple]) -> None:
        skip = False
        for cmd in commands:
            self.server.sent.append(cmd)
            if cmd[:2] == ("CLIENT", "REPLY"):
                if self.server.honours:
                    skip = True
                    continue
                self.pending.append(redis.exceptions.ResponseError("ERR unknown subcommand"))
                continue
            if cmd[0] == "SET":
                self.server.data[cmd[1]] = cmd[2]
            reply = cmd[1].encode() if cmd[0] == "PING" else b"OK"
            if not skip:
                self.pending.append(reply)
            skip = False

    def read_response(self) -> object:
        reply = self.pending.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def disconnect(self) -> None:
        self.pending.clear()


class ReplyServer(OldRedis):
    def __init__(self, honours: bool) -> None:
        super().__init__()
        self.honours = honours
        self.sent: list[tuple] = []
        self.conn = Conn(self)
        self.connection_pool = self

    def get_connection(self) -> Conn:
        assert not self.conn.pending, "a pooled connection must come back with nothing unread"
        return self.conn

    def release(self, conn: Conn) -> None:
        pass


@pytest.mark.parametrize("honours", [True, False])
def test_finish_skips_the_reply_only_where_the_server_honours_it(honours: bool) -> None:
    server = ReplyServer(honours)
    store = IdempotencyStore(server, ttl_s=60)
    store.finish("t", "task:1", "r1")
    store.finish("t", "task:2", "r2")
    assert store._reply_skip is honours and not server.conn.pending
    for n in ("1", "2"):
        assert json.loads(server.data[f"tidegate:idem:t:task:{n}"])["s"] == "done"
    sets = [c for c in server.sent if c[0] == "SET"]
    assert len(sets) == (2 if honours else 0)  # else redis-py's own set(), answer awaited
    assert server.set_calls == (0 if honours else 2)
