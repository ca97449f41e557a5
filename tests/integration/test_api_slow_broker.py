"""A broker that accepts connections and never answers: the API refuses at once, it does not
queue requests behind the publishes that hang (issue 17: refusals took seconds, because every
request waited for one of asyncio.to_thread's few threads).

The real ``tidegate api`` subprocess; its broker URL points at a socket that reads and never
replies, so every publish (and every depth probe) hangs until its socket timeout. The state
Redis is real. Bounds are generous (a loaded 2-core machine): what is checked is that refusals
do not wait for the hung publishes, which take several seconds each.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Broker, tidegate_env
from tests.support.api import tidegate_api
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration
TOKEN = "slow-broker-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP server that accepts, reads and never writes a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conns.append(conn)
                threading.Thread(target=lambda c=conn: _drain(c, stop), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    stop.set()
    for conn in conns:
        conn.close()
    server.close()


def _drain(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.2)
    while not stop.is_set():
        try:
            if not conn.recv(65536):
                return
        except TimeoutError:
            continue
        except OSError:
            return


@pytest.fixture
def api(black_hole: int, policy_file: Path, tmp_path: Path, state_redis) -> Iterator[str]:
    env = tidegate_env(Broker("redis", f"redis://127.0.0.1:{black_hole}/0"), policy_file,
                       TIDEGATE_API_TOKENS=TOKEN, TIDEGATE_API_PUBLISH_THREADS="2")
    with tidegate_api(env, tmp_path / "api.log") as (url, _):
        yield url


def _post(url: str, priority: str, n: int, timeout: float = 60,
          key: str | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        r = httpx.post(f"{url}/v1/jobs", headers=AUTH, timeout=timeout, json={
            "task": "search.index", "args": [f"d{n}"], "priority": priority,
            **({"idempotency_key": key} if key else {})})
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__, time.monotonic() - started
    return r.status_code, r.json().get("error", ""), time.monotonic() - started


def test_a_hung_broker_gets_requests_refused_at_once(api: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        # these take both publish threads and hang there (the broker never answers); the
        # client gives up after a few seconds, the server's publishes hang on. Keyed, so each
        # runs alone: keyless jobs arriving together may share one thread as a batch
        for i in range(2):
            pool.submit(_post, api, "critical", i, 8, f"hang-{i}")
        wait_until(lambda: 'tidegate_api_publish_lane{state="running"} 2.0' in httpx.get(
            f"{api}/metrics", timeout=5).text, 30, message="both publish threads busy")
        answers = list(pool.map(lambda n: _post(api, ["high", "medium", "low"][n % 3], n),
                                range(30)))
    assert {(status, error) for status, error, _ in answers} == {(503, "shed")}, answers
    slowest = max(took for _, _, took in answers)
    # a refusal that waited for a hung publish would take its socket timeout (seconds)
    assert slowest < 2.0, sorted(took for _, _, took in answers)[-5:]
    assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
