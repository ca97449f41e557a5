"""Fault drill: the broker dies and comes back while producers and a worker are running.

Redis runs on its own port with append-only persistence (fsync on every write) and is killed
with SIGKILL; RabbitMQ's application is stopped and started (durable queues, persistent
messages, publisher confirms). A steady mixed load (keyed charges, unkeyed charges,
``search.index``: ``tests.support.load``) runs throughout. The promise, counted per job: every
job whose enqueue returned is served or dead-lettered after the broker comes back (lost 0),
none is applied twice, and the worker resumes within ``STALL_S``; while the broker is down
producers get ``BrokerUnavailable`` at once (after the first refusal, the publish path's short
circuit answers without a connect timeout), and they recover by themselves afterwards.
``TIDEGATE_DRILL_SCALE`` stretches the drill (`make drills`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import STATE_REDIS_URL, Broker
from tests.support.load import MixedLoad, account, settled
from tests.support.procs import Proc, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
RATE = 20.0  # jobs/s of the mixed load (keyed charges, unkeyed charges, search.index)
SHORT_VISIBILITY = {"TIDEGATE_VISIBILITY_TIMEOUT_S": "12", "TIDEGATE_TASK_HARD_TIME_LIMIT_S": "10",
                    "TIDEGATE_TASK_SOFT_TIME_LIMIT_S": "8"}
STALL_S = 8.0  # after the broker is back, the worker resumes within a few seconds


def _drill(broker: Broker, kill, revive, sims, policy_file, tmp_path, start_worker) -> None:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=policy_file, connect_timeout_s=1.0)
    app = create_app(settings)
    # Late-acked tasks caught mid-flight by the crash wait in kombu's unacked set (Redis) for
    # the visibility timeout before they are redelivered: shorten it so the drill sees them.
    worker = start_worker("payments,search", concurrency=4, env=SHORT_VISIBILITY)
    load = MixedLoad(Producer(app), RATE, prefix=f"br{broker.name}")
    with load:
        wait_until(lambda: len(load.accepted) >= 40 * SCALE, 60, message="jobs before the fault")
        kill()
        wait_until(lambda: len(load.refused) >= 3, 60, message="producers refused while down")
        time.sleep(2 * SCALE)  # stay down a while: the drill is about an outage, not a blip
        refused_while_down = list(load.refusal_s)
        revive()
        back = time.time()
        before = len(load.accepted)
        wait_until(lambda: len(load.accepted) >= before + 40 * SCALE, 120,
                   message="producers recovering after the broker came back")
    try:
        wait_until(lambda: settled(load, sims, app), 180, interval=1.0,
                   message=f"all {len(load.accepted)} accepted jobs served or dead-lettered")
    finally:
        result = account(load, sims, app, since=back)
        app.close()
    fast = sorted(refused_while_down[1:])  # the first refusal found the broker gone
    line = (f"{broker.name} broker killed: {result.line()}; refusals while down: "
            f"{len(refused_while_down)}, median {statistics.median(fast) * 1000:.1f} ms, max "
            f"{max(fast) * 1000:.1f} ms (connect timeout {settings.connect_timeout_s:.0f} s)")
    print(f"\n{line}")
    assert not result.lost, f"{line}: {result.lost[:20]}"
    assert not result.doubled, f"{line}: {result.doubled}"
    assert result.stall_s < STALL_S, f"{line}\n{worker.output()[-4000:]}"
    assert all("broker unreachable" in msg for _, msg in load.refused), load.refused[:3]
    # Fail fast: once the broker is known down, refusals take milliseconds. A RabbitMQ node that
    # is stopping or booting accepts TCP before it speaks AMQP, so a probe can reopen the gate
    # for one publish that then waits (seen: one of ten at 2.0 s); none may outlast a publish's
    # own bound.
    assert statistics.median(fast) < 0.1, line
    assert max(fast) < settings.connect_timeout_s + settings.publish_timeout_s, line


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

    _purge_amqp(broker.url, ["payments", "search", "payments.dlq", "search.dlq"])
    start_worker = request.getfixturevalue("start_worker_on")(broker)
    try:
        _drill(broker, lambda: ctl("stop_app"), lambda: (ctl("start_app"),
               ctl("await_startup")), sims, policy_file, tmp_path, start_worker)
    finally:
        ctl("start_app")
