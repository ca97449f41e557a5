"""A dependency's pooled connection is not reused after the server may have closed it.

A server drops a keep-alive connection once it has been idle for its limit (uvicorn 5 s,
gunicorn 2 s). A request written on it just as that happens is reset unread: nothing
applied, yet for a charge without a key it is a failure after sending, dead-lettered as
``transient_failure_not_idempotent`` (the connection-loss drill's prefork flake: a child's
connection idle ~4.9 s against the simulator's 5 s). httpx's own idle limit is 5 s, so the
client must close idle connections sooner (``downstream_keepalive_s``).

The server here makes that race deterministic: a request arriving on a connection idle for
its limit or longer is dropped unread, as if its idle timer had fired first.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from workers.downstream import DownstreamClient, DownstreamError
from workers.settings import Settings


class StrictKeepAliveServer:
    """HTTP/1.1 on loopback that drops, unread, a request on a connection idle >= ``idle_s``.
    ``peers`` lists the client port of each request it answered (one port per connection)."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.peers: list[int] = []
        self.dropped = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, (_, port) = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, port), daemon=True).start()

    def _serve(self, conn: socket.socket, port: int) -> None:
        idle_since = time.monotonic()
        with conn:
            while True:
                conn.settimeout(None)
                if not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed it
                if time.monotonic() - idle_since >= self.idle_s:
                    self.dropped += 1
                    # unread data in the buffer: the close is a reset, as from a real server
                    return
                if not self._answer(conn, port):
                    return
                idle_since = time.monotonic()

    def _answer(self, conn: socket.socket, port: int) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.peers.append(port)  # before the answer: the client reads peers once answered
        payload = json.dumps({"id": "ch_1", "status": "applied"}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        return True

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def server() -> Iterator[StrictKeepAliveServer]:
    srv = StrictKeepAliveServer(idle_s=1.2)  # above the default keep-alive (1 s)
    yield srv
    srv.close()


def _charge(client: DownstreamClient) -> dict:
    return client.post("/effects/charge", {"account": "a", "amount_cents": 1})


def test_a_connection_idle_past_the_keepalive_is_not_reused(server) -> None:
    client = DownstreamClient("payments", server.url, Settings())
    _charge(client)
    _charge(client)  # at once: the pooled connection is reused
    time.sleep(1.4)  # the idle time is what is under test: past the server's limit
    assert _charge(client)["status"] == "applied"  # without the fix: DownstreamError (reset)
    assert server.dropped == 0
    assert server.peers[0] == server.peers[1] != server.peers[2], server.peers


def test_a_reset_on_a_stale_connection_is_the_failure_the_keepalive_prevents(server) -> None:
    """The failure itself, with a client keeping connections longer than the server (httpx's
    default 5 s): a transient error after sending, the request never applied."""
    client = DownstreamClient("payments", server.url, Settings(downstream_keepalive_s=5.0))
    _charge(client)
    time.sleep(1.4)
    with pytest.raises(DownstreamError, match="cannot reach"):
        _charge(client)
    assert server.dropped == 1 and len(server.peers) == 1


def test_the_default_keepalive_is_below_common_servers_idle_limits() -> None:
    """gunicorn's 2 s is the shortest common default (uvicorn, Node, Apache: 5 s)."""
    assert Settings().downstream_keepalive_s < 2.0
