"""Shared fixtures: real Redis, RabbitMQ, a moto SQS server, simulators and Celery workers.

Isolation: ``TIDEGATE_TEST_SLOT`` (0-6; under pytest-xdist ``TIDEGATE_TEST_SLOT_BASE`` plus the
worker's index) picks the Redis databases and the RabbitMQ vhost, so parallel test runs do not
trample each other's queues. Slot 5 shares Redis db 7 with the benchmarks.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tidegate.stack import ROOT, MotoServer, Sim, Worker, ensure_vhost, wait_until, write_policy
from workers.installation import installation

pytest_plugins = ("tests.support.sentinel",)  # the sentinel_group fixture

# Under pytest-xdist each worker takes the slot of its index (gw0 -> 0, gw1 -> 1, ...), plus
# TIDEGATE_TEST_SLOT_BASE so that two whole runs can share one machine (base 0 and base 2).
SLOT = int(os.environ.get("TIDEGATE_TEST_SLOT")
           or int(os.environ.get("TIDEGATE_TEST_SLOT_BASE", "0"))
           + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")))
# Slot 6 takes dbs 0 and 1, which only `make run` uses (db 8 belongs to the benchmarks and db 9
# to the shared-state tests, which never flush it). TIDEGATE_TEST_REDIS_PORT points a run at a
# private redis-server, where any slot is free.
_SLOT_DBS = [(10, 11), (12, 13), (14, 15), (2, 3), (4, 5), (6, 7), (0, 1)]
BROKER_DB, STATE_DB = _SLOT_DBS[SLOT % len(_SLOT_DBS)]
REDIS_PORT = int(os.environ.get("TIDEGATE_TEST_REDIS_PORT", "6379"))
REDIS_BROKER_URL = f"redis://127.0.0.1:{REDIS_PORT}/{BROKER_DB}"
STATE_REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{STATE_DB}"
VHOST = f"tidegate_test_{SLOT}"
AMQP_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
SIM_NAMES = ("payments", "search", "email", "pricing")


def _services(*names: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services.sh"), *names], check=True, timeout=180)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = ROOT / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def redis_up() -> str:
    _services("redis")
    return REDIS_BROKER_URL


@pytest.fixture(scope="session")
def rabbitmq_up() -> str:
    _services("rabbitmq")
    ensure_vhost(VHOST)
    return AMQP_URL


@pytest.fixture
def state_redis(redis_up: str) -> Iterator[redis.Redis]:
    """A clean Redis database for shared state (breakers, limiters, idempotency keys)."""
    from workers.depth import flush_all

    # Producers of earlier tests in this process may still hold publish counts their flusher
    # thread has not merged yet; landing after the flush they would inflate this test's
    # depth estimates (seen: HIGH refused "at depth 10" with 7 messages queued).
    flush_all(skip_failing=True)  # not those of a server an earlier test took away
    client = redis.Redis.from_url(STATE_REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    client.flushdb()
    yield client
    client.close()


@dataclass(frozen=True)
class Broker:
    name: str  # "redis" or "amqp"
    url: str


def _purge_amqp(url: str, queues: list[str]) -> None:
    """Empty the queues but keep them: kombu's global producer pool remembers what it declared,
    so a deleted queue would not be re-declared and messages would be dropped unroutable."""
    from kombu import Connection

    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=url))
    with Connection(url, connect_timeout=5) as conn:
        installation(app).topology.declare(conn)
        channel = conn.channel()
        for q in queues:
            channel.queue_purge(q)
    app.close()


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, policy_file: Path) -> Broker:
    """Each broker Tidegate supports, emptied before the test."""
    from workers.topology import load_topology

    topology = load_topology(policy_file)
    names = list(topology.work_queues) + [topology.dead_letter_queue(q)
                                          for q in topology.work_queues]
    if request.param == "redis":
        request.getfixturevalue("redis_up")
        redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
        return Broker("redis", REDIS_BROKER_URL)
    url = request.getfixturevalue("rabbitmq_up")
    _purge_amqp(url, names)
    return Broker("amqp", url)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tidegate")


@pytest.fixture(scope="session")
def _sims(session_tmp: Path) -> Iterator[dict[str, Sim]]:
    sims = {name: Sim(name, session_tmp) for name in SIM_NAMES}
    yield sims
    for sim in sims.values():
        sim.stop()


@pytest.fixture
def sims(_sims: dict[str, Sim]) -> dict[str, Sim]:
    """The four downstream simulators, reset to healthy with empty ledgers."""
    for sim in _sims.values():
        sim.reset()
    return _sims


@pytest.fixture(scope="session")
def policy_file(_sims: dict[str, Sim], session_tmp: Path) -> Path:
    """The shipped policy file with each dependency's URL pointing at its simulator."""
    return write_policy(_sims, session_tmp / "policy.toml")


def tidegate_env(broker: Broker, policy_file: Path, **extra: str) -> dict[str, str]:
    """Environment for a Tidegate subprocess on ``broker``."""
    return {
        "TIDEGATE_BROKER_URL": broker.url,
        "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
        "TIDEGATE_POLICY_FILE": str(policy_file),
        **extra,
    }


@pytest.fixture
def settings(broker: Broker, policy_file: Path):
    from workers.settings import load_settings

    return load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                         policy_file=policy_file)


@pytest.fixture
def celery_app(settings):
    from workers.application import create_app

    app = create_app(settings)
    yield app
    app.close()


@pytest.fixture
def producer(celery_app):
    from producers import Producer

    return Producer(celery_app)


@pytest.fixture
def start_worker(broker: Broker, policy_file: Path, tmp_path: Path, state_redis):
    """Start ``celery -A workers worker -Q QUEUES`` subprocesses; all stopped at teardown."""
    started: list[Worker] = []

    def start(queues: str, *, ready: bool = True, env: dict[str, str] | None = None,
              **options) -> Worker:
        worker = Worker(queues, tidegate_env(broker, policy_file, **(env or {})), tmp_path,
                        **options)
        started.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def start_worker_on(policy_file: Path, tmp_path: Path, state_redis):
    """Like ``start_worker`` for a broker the test made itself: ``start_worker_on(broker)``."""
    started: list[Worker] = []

    def bind(broker: Broker):
        def start(queues: str, *, ready: bool = True, env: dict[str, str] | None = None,
                  **options) -> Worker:
            worker = Worker(queues, tidegate_env(broker, policy_file, **(env or {})),
                            tmp_path, **options)
            started.append(worker)
            return worker.wait_ready() if ready else worker

        return start

    yield bind
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def moto_sqs(session_tmp: Path) -> Iterator[MotoServer]:
    """An SQS endpoint: a moto server on a free loopback port, for the whole session."""
    server = MotoServer(session_tmp)
    yield server
    server.stop()


def sqs_env(moto: MotoServer, prefix: str) -> dict[str, str]:
    """Environment pointing a Tidegate process's queue-for-later store at ``moto``."""
    return {
        "TIDEGATE_SQS_ENDPOINT_URL": moto.url,
        "TIDEGATE_AWS_ACCESS_KEY_ID": "testing",
        "TIDEGATE_AWS_SECRET_ACCESS_KEY": "testing",
        "TIDEGATE_DEFERRAL_QUEUE_PREFIX": prefix,
    }


@pytest.fixture
def deferral_prefix() -> str:
    """A fresh SQS queue-name prefix: each test gets its own deferral queues on moto."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}-"


__all__ = ["AMQP_URL", "REDIS_BROKER_URL", "STATE_REDIS_URL", "Broker", "tidegate_env",
           "wait_until"]
