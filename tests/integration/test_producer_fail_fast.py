"""Producers fail fast while the broker refuses connections, and recover by themselves.

A private redis-server on a free port is the broker (the shared one is never stopped). Once a
publish has found it gone, each further enqueue is refused by the publish path's short circuit
without a connect attempt (producers.broker_gate); a background probe opens it again when the
broker is back. The refusal times are printed; the assertion leaves room for a loaded machine
(well under the connect timeout, which every call used to wait out).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import STATE_REDIS_URL
from tests.support.procs import Proc, free_port, wait_until
from workers.errors import BrokerUnavailable

pytestmark = pytest.mark.integration
CONNECT_TIMEOUT_S = 2.0


def test_refusals_are_immediate_while_the_broker_is_down(tmp_path: Path, policy_file,
                                                         state_redis) -> None:
    from producers import Job, Producer
    from workers.application import create_app
    from workers.settings import load_settings

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no"]
    url = f"redis://127.0.0.1:{port}/0"
    proc = Proc(argv, {}, tmp_path / "redis-1.log", "redis")
    app = create_app(load_settings(broker_url=url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file, connect_timeout_s=CONNECT_TIMEOUT_S))
    try:
        wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30,
                   message="private redis")
        producer = Producer(app)
        producer.enqueue("search.index", ["before"])
        proc.kill()
        proc.popen.wait(10)
        times = []
        asked: list = []  # depth admissions asked once the broker is known down
        for i in range(20):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="broker unreachable"):
                producer.enqueue("search.index", [f"down-{i}"])
            times.append(time.monotonic() - started)
            if i == 0:  # the first found it gone: the rest must not probe the depth either
                producer.throttle.admit = lambda *a, _real=producer.throttle.admit, **k: (
                    asked.append(a), _real(*a, **k))[1]
        results = producer.enqueue_many([Job("search.index", [f"batch-{i}"]) for i in range(3)])
        assert all(isinstance(r, BrokerUnavailable) for r in results), results
        # a RabbitMQ node that is stopping accepts TCP and then says nothing: a depth probe
        # there waits out the connect timeout (the broker-restart drill saw 2 s refusals)
        assert asked == [], asked
        after_first = times[1:]
        print(f"\nrefusals while the broker is down: first {times[0] * 1000:.1f} ms, then median "
              f"{statistics.median(after_first) * 1000:.2f} ms, max "
              f"{max(after_first) * 1000:.2f} ms over {len(after_first)} calls "
              f"(connect timeout {CONNECT_TIMEOUT_S * 1000:.0f} ms)")
        assert max(after_first) < CONNECT_TIMEOUT_S / 4, after_first
        proc = Proc(argv, {}, tmp_path / "redis-2.log", "redis")
        wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30,
                   message="private redis back")
        started = time.monotonic()
        result = wait_until(lambda: _try(producer), 30, interval=0.05,
                            message="the producer publishing again")
        print(f"publishing again {time.monotonic() - started:.2f} s after the broker was back")
        assert result.state == "queued"
    finally:
        app.close()
        proc.stop()


def _try(producer):
    try:
        return producer.enqueue("search.index", ["after"])
    except BrokerUnavailable:
        return None
