"""Fault drill: RabbitMQ closes the worker's and the producer's connections under load.

A steady mixed load (keyed charges, unkeyed charges, ``search.index``) runs through one worker
(``-Q payments,search``, 8 threads, or prefork) while ``rabbitmqctl close_connection`` closes
every connection of this test's own vhost, twice (x scale), with charges in flight at the
payments simulator (500 ms each). RabbitMQ redelivers each unacked message at once, often
while its first run is still going. The promise, counted per job (``tests.support.load``):
nothing accepted is lost, nothing is applied twice, no accepted job waits more than
``STALL_S`` while nothing is applied (the worker reconnects and goes on consuming), no job
runs twice at once (the payments simulator answers a second request with a key still in
progress 409; none may come) and nothing is dead-lettered (running tasks are not killed on a
connection loss; their redelivered copies wait for them). The shared RabbitMQ is never
restarted; only this vhost's connections are closed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import STATE_REDIS_URL, VHOST, Broker, _purge_amqp
from tests.support.load import MixedLoad, account, dead_letter_details, settled
from tests.support.policy import with_timeouts
from tests.support.procs import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
RATE = 10.0  # jobs/s, as in issue 21 (400 jobs over 40 s)
LOAD_S = 20 * SCALE
CLOSES = max(2, int(2 * SCALE))
STALL_S = 8.0  # "a few seconds": a reconnect takes ~1-2 s on a loaded machine
CHARGE_MS = 500  # charges in flight at every close: most closes catch several running


def _ctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120,
                          capture_output=True, text=True).stdout


def close_vhost_connections(vhost: str) -> int:
    """``rabbitmqctl close_connection`` for every connection of ``vhost`` (and no other)."""
    pids = [line.split("\t")[0] for line in _ctl("list_connections", "pid", "vhost").splitlines()
            if line.endswith(f"\t{vhost}")]
    closers = [subprocess.Popen(["rabbitmqctl", "-q", "close_connection", pid, "drill"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for pid in pids]
    for closer in closers:
        closer.wait(120)
    return len(pids)


@pytest.fixture
def drill_policy(policy_file: Path, tmp_path: Path) -> Path:
    """The test policy with room for a 500 ms charge (the shipped one allows 80 ms an attempt):
    this drill is about connections, not a slow provider tripping the breaker."""
    return with_timeouts(policy_file, "payments", 2000, 5000, tmp_path / "policy.toml")


def run_drill(pool: str, sims, policy_file: Path, start_worker_on, rabbitmq_up: str) -> str:
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    broker = Broker("amqp", rabbitmq_up)
    _purge_amqp(broker.url, ["payments", "search", "payments.dlq", "search.dlq"])
    sims["payments"].control(latency_ms=CHARGE_MS)
    sims["search"].control(latency_ms=20)
    worker = start_worker_on(broker)("payments,search", pool=pool, concurrency=8,
                                     env={"TIDEGATE_POLICY_FILE": str(policy_file)})
    app = create_app(load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                                   policy_file=policy_file, connect_timeout_s=1.0))
    closed: list[int] = []
    load = MixedLoad(Producer(app), RATE, prefix=f"cl{pool[:2]}")
    try:
        with load:
            for i in range(CLOSES):
                wait_until(lambda i=i: len(load.accepted) >= RATE * LOAD_S * (i + 1)
                           / (CLOSES + 1), LOAD_S * 4, message=f"load before close {i + 1}")
                closed.append(close_vhost_connections(VHOST))
            wait_until(lambda: len(load.accepted) + len(load.refused) >= RATE * LOAD_S,
                       LOAD_S * 4, message="the rest of the load")
        wait_until(lambda: settled(load, sims, app), 120, interval=1.0,
                   message="every accepted job served or dead-lettered")
    except AssertionError as exc:
        result = account(load, sims, app)
        raise AssertionError(f"{exc}\n{pool}: {result.line()}; lost {result.lost[:10]}; "
                             f"worker log tail:\n{worker.output()[-4000:]}") from None
    finally:
        app.close()
    result = account(load, sims, app)
    line = f"{pool}: closes {closed}: {result.line()}"
    print(f"\nconnection-loss drill, {line}")
    assert all(n >= 2 for n in closed), f"expected the worker's and the producer's: {closed}"
    assert not result.lost, line
    assert not result.doubled, f"{line}: {result.doubled}"
    assert result.stall_s < STALL_S, f"{line}\n{worker.output()[-4000:]}"
    # No job ran twice at once: a redelivered copy waits for its run in flight (parked), so
    # the provider never saw a second request with a key still in progress, and no copy was
    # dead-lettered as outcome unknown while its first run was still going.
    assert result.conflicts == 0, f"{line}: a job ran twice at once"
    # each dead letter with its error (an attempt timeout? a refused connection?), and the
    # worker's log around it: a rare failure must explain itself from the first report
    assert not result.reasons, f"{line}\n{dead_letter_details(app, log=worker.output())}"
    assert worker.alive(), worker.output()[-3000:]
    return line


@pytest.mark.timeout(600 * SCALE)
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_consumes_on_after_connection_closes(pool, sims, drill_policy, start_worker_on,
                                                    rabbitmq_up) -> None:
    started = time.monotonic()
    run_drill(pool, sims, drill_policy, start_worker_on, rabbitmq_up)
    print(f"  took {time.monotonic() - started:.0f} s")
