"""Clients that hang up mid-body are not server errors: no traceback, no 5xx in the metrics.

The real ``tidegate api`` subprocess (uvicorn, as in production); raw sockets announce a body
and close the connection after part of it. Starlette raises ``ClientDisconnect`` inside the
handler; it used to escape as "Exception in ASGI application" with a traceback and count as
``tidegate_api_requests_total{status="500"}`` though no 500 was ever sent.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_BROKER_URL, Broker, tidegate_env
from tests.support.api import tidegate_api
from tests.support.procs import Proc, wait_until

pytestmark = pytest.mark.integration
TOKEN = "hangup-token"
HANGUPS = 40


@pytest.fixture
def api(redis_up, policy_file: Path, tmp_path: Path, state_redis) -> Iterator[tuple[str, Proc]]:
    env = tidegate_env(Broker("redis", REDIS_BROKER_URL), policy_file,
                       TIDEGATE_API_TOKENS=TOKEN)
    with tidegate_api(env, tmp_path / "api.log") as running:
        yield running


def _hang_up(port: int, path: str, sent: int) -> None:
    """Announce a 4 KiB JSON body, send ``sent`` bytes of it, close the socket."""
    body = b'{"task": "search.index", "args": ["' + b"x" * 4096 + b'"]}'
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body[:sent])
        sock.shutdown(socket.SHUT_WR)


def _count(metrics: str, route: str, status: str) -> float:
    pattern = (r'tidegate_api_requests_total\{route="' + re.escape(route) + r'",status="'
               + status + r'"\} ([0-9.e+]+)')
    return sum(float(m) for m in re.findall(pattern, metrics))


def test_early_hangups_are_counted_as_499_without_a_traceback(api) -> None:
    url, proc = api
    port = int(url.rsplit(":", 1)[1])
    for i in range(HANGUPS):
        _hang_up(port, "/v1/jobs/batch" if i % 4 == 0 else "/v1/jobs", sent=i * 37 % 200)

    def hangups_seen() -> float:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return _count(text, "/v1/jobs", "499") + _count(text, "/v1/jobs/batch", "499")

    # every hang-up is answered (to nobody) and counted; poll until the server saw them all
    wait_until(lambda: hangups_seen() >= HANGUPS, 30, interval=0.2,
               message=f"{HANGUPS} hang-ups counted as 499")
    text = httpx.get(f"{url}/metrics", timeout=5).text
    assert not re.search(r'tidegate_api_requests_total\{[^}]*status="5\d\d"', text), text
    # the service still answers a whole request
    r = httpx.post(f"{url}/v1/jobs", json={"task": "search.index", "args": ["ok"]},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 202, r.text
    out = proc.output()
    assert "Traceback" not in out and "Exception in ASGI" not in out, out[-3000:]
