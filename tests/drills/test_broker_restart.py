"""Fault drill: the broker dies and comes back while producers and a worker are running.

Redis runs on its own port with append-only persistence (fsync on every write) and is killed
with SIGKILL; RabbitMQ's application is stopped and started (durable queues, persistent
messages, publisher confirms). The promise: every job whose enqueue returned is done after
the broker comes back; while it is down producers get ``BrokerUnavailable`` quickly, and they
recover by themselves afterwards. ``TIDEGATE_DRILL_SCALE`` stretches the drill (`make drills`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import STATE_REDIS_URL, Broker
from tests.support.procs import Proc, free_port, wait_until
from workers.errors import BrokerUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
SHORT_VISIBILITY = {"TIDEGATE_VISIBILITY_TIMEOUT_S": "12", "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "10",
                    "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "8"}


class Flood:
    """A producer thread enqueueing unique jobs until stopped, recording what was accepted."""

    def __init__(self, producer, rate: float = 40.0) -> None:
        self.producer, self.interval = producer, 1.0 / rate
        self.accepted: list[str] = []
        self.refused: list[tuple[float, str]] = []
        self.refusal_times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"drill-{i}"
            started = time.monotonic()
            try:
                self.producer.enqueue("search.index", [key], idempotency_key=key)
                self.accepted.append(key)
                i += 1
            except BrokerUnavailable as exc:
                self.refused.append((time.monotonic(), str(exc)))
                self.refusal_times.append(time.monotonic() - started)
                i += 1  # the key was refused, never accepted: a new key for the next job
            self._stop.wait(self.interval)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _accepted_all_done(sim, accepted: list[str]) -> bool:
    effects = sim.ledger()["effects"]
    return all(f"index:{k}" in effects or k in effects for k in accepted)


def _drill(broker: Broker, kill, revive, sims, policy_file, tmp_path, start_worker) -> None:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file, connect_timeout_s=1.0)
    app = create_app(settings)
    producer = Producer(app)
    # Late-acked tasks caught mid-flight by the crash wait in kombu's unacked set (Redis) for
    # the visibility timeout before they are redelivered: shorten it so the drill sees them.
    start_worker("search", concurrency=4, env=SHORT_VISIBILITY)
    with Flood(producer) as flood:
        wait_until(lambda: len(flood.accepted) >= 40 * SCALE, 60, message="jobs before the fault")
        kill()
        wait_until(lambda: len(flood.refused) >= 3, 60, message="producers refused while down")
        time.sleep(2 * SCALE)  # stay down a while: the drill is about an outage, not a blip
        revive()
        before = len(flood.accepted)
        wait_until(lambda: len(flood.accepted) >= before + 40 * SCALE, 120,
                   message="producers recovering after the broker came back")
    app.close()
    try:
        wait_until(lambda: _accepted_all_done(sims["search"], flood.accepted), 180,
                   interval=0.5, message=f"all {len(flood.accepted)} accepted jobs done")
    except AssertionError:
        effects = sims["search"].ledger()["effects"]
        missing = [k for k in flood.accepted if k not in effects and f"index:{k}" not in effects]
        raise AssertionError(f"{len(missing)} of {len(flood.accepted)} accepted jobs never "
                             f"done: {missing[:20]}") from None
    assert all("broker unreachable" in msg for _, msg in flood.refused), flood.refused[:3]
    assert max(flood.refusal_times) < 15, "a refusal must come within the connect timeout"
    effects = sims["search"].ledger()["effects"]
    assert all(e["requests"] >= 1 for e in effects.values())


def test_redis_broker_killed_and_restarted(sims, policy_file, tmp_path: Path, request,
                                          redis_up):
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--dir", str(data)]
    server = {"proc": Proc(argv, {}, tmp_path / "redis-1.log", "redis")}
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30, message="redis")

    def kill() -> None:
        server["proc"].kill()
        server["proc"].popen.wait(10)

    def revive() -> None:
        server["proc"] = Proc(argv, {}, tmp_path / "redis-2.log", "redis")
        wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30,
                   message="redis back")

    broker = Broker("redis", url)
    request.node.broker = broker
    start_worker = request.getfixturevalue("start_worker_on")(broker)
    try:
        _drill(broker, kill, revive, sims, policy_file, tmp_path, start_worker)
    finally:
        server["proc"].stop()


@pytest.mark.serial  # stops the shared RabbitMQ: nothing else may run meanwhile
def test_rabbitmq_stopped_and_started(sims, policy_file, tmp_path: Path, request, rabbitmq_up):
    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120,
                       capture_output=True)

    broker = Broker("amqp", rabbitmq_up)
    from tests.conftest import _purge_amqp

    _purge_amqp(broker.url, ["search"])
    start_worker = request.getfixturevalue("start_worker_on")(broker)
    try:
        _drill(broker, lambda: ctl("stop_app"), lambda: (ctl("start_app"),
               ctl("await_startup")), sims, policy_file, tmp_path, start_worker)
    finally:
        ctl("start_app")
