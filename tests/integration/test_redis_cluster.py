"""Shared state on a real local Redis Cluster (three masters, one replica each), started by
``scripts/services.sh redis-cluster`` on free ports: every script and transaction lands in one
slot, breakers and limiters are shared across processes, and a master's failover is survived.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from resilience.breaker import BreakerConfig, CircuitBreaker
from resilience.errors import CircuitOpen, TransientError
from resilience.stores import RedisCache, RedisStore, redis_client
from tidegate.stack import ROOT, free_port_block, wait_until

from . import _redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CTX = mp.get_context("spawn")
NODES = 6  # 3 masters + 3 replicas


def _base_port() -> int:
    """A base port whose six node ports and six bus ports (+10000) are all free."""
    return free_port_block([*range(NODES), *range(10000, 10000 + NODES)])


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.base = _base_port()
        self.env = {**os.environ, "REDIS_CLUSTER_DIR": str(tmp), "REDIS_CLUSTER_PORT":
                    str(self.base), "REDIS_CLUSTER_NODE_TIMEOUT_MS": "1000"}
        self.url = f"redis-cluster://127.0.0.1:{self.base},127.0.0.1:{self.base + 1}"

    def services(self, target: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "services.sh"), target], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    def pid(self, port: int) -> int:
        return int((self.dir / str(port) / "redis.pid").read_text())

    def client(self, **kw):
        return redis_client(self.url, socket_timeout=2.0, socket_connect_timeout=2.0, **kw)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli not installed (apt-get install redis-server)")
    c = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    out = c.services("redis-cluster")
    try:
        assert out.returncode == 0, out.stderr
        yield c
    finally:
        c.services("redis-cluster-stop")  # kills the pids its own start wrote, nothing else


def _owner_port(client, key: str) -> int:
    node = client.cluster.get_node_from_key(key)
    return int(node.port)


def test_every_script_and_transaction_touches_one_slot(cluster):
    """Each store's operations on a cluster whose masters split the keys: a script or
    MULTI spanning slots would be refused (CROSSSLOT), a key built inside a script unknown."""
    from prometheus_client import CollectorRegistry, Counter

    from producers.idempotency import SubmissionStore
    from workers.autoscale import ProcessingTimes
    from workers.cluster_metrics import CounterMirror, read_cluster_counters
    from workers.depth import RedisDepthProbe, SharedDepthCache
    from workers.idempotency import IdempotencyStore, MarkState
    from workers.replayer import SweepSchedule
    from workers.topology import redis_priority_lists

    client = cluster.client()
    prefix = _redis.new_prefix()
    store = RedisStore(client, prefix=prefix)
    cfg = BreakerConfig(minimum_calls=4, open_duration=30.0)
    owners = set()
    for name in ("payments", "search", "email", "pricing", "a", "b", "c"):
        b = CircuitBreaker(name, cfg, store)
        for _ in range(4):
            b.record(b.acquire(), TransientError("down"), 0.001)
        with pytest.raises(CircuitOpen):
            b.acquire()
        assert not store.degraded, f"breaker {name} fell back to local state"
        assert store.breaker_read(name, cfg).state == "open"
        store.breaker_force(name, cfg, "closed", 0)
        owners.add(_owner_port(client, store.key("breaker", name, "state")))
        assert store.gcra(name, 10.0, 1)[0] and not store.gcra(name, 10.0, 1)[0]
        store.budget_add(name, 10, 10.0)
        assert store.budget_spend(name, 1, 0.2, 0, 10.0)
        assert not store.degraded
    assert len(owners) >= 2, "the keys all fell on one master: the test would prove nothing"

    cache = RedisCache(client, prefix=prefix)
    cache.set("price:1", {"eur": 3}, 60)
    assert cache.get("price:1").value == {"eur": 3}

    marks = IdempotencyStore(client, 60, prefix=f"{prefix}:idem")
    # SET NX GET and the run's lease in one pipeline (two slots; the script kept for Redis
    # < 7 cannot run in a cluster pipeline: a cluster needs Redis >= 7 for the marks)
    assert marks.begin("email.send", "k1").state is MarkState.NEW
    assert marks.begin("email.send", "k1").state is MarkState.STARTED
    marks.finish("email.send", "k1", {"ok": 1})
    assert marks.peek("email.send", "k1").state is MarkState.DONE
    marks.close()

    submissions = SubmissionStore(client, prefix=f"{prefix}:api")
    r = submissions.reserve("client", "key-1", {"task": "x"})
    submissions.release(r)  # a Lua compare-and-delete
    assert client.get(r.key) is None

    schedule = SweepSchedule(f"{prefix}-email", client)
    assert schedule.claim(0.0) in (True, False)  # the script ran (no error) ...
    assert client.get(schedule.key) is not None  # ... and stored the next sweep

    depth = SharedDepthCache(RedisDepthProbe(client), client, prefix=f"{prefix}:depth")
    client.lpush("ha-depth-q", "m1", "m2")
    client.lpush(redis_priority_lists("ha-depth-q")[2], "m3")
    try:
        depth.record_published("ha-depth-q", 3)
        depth.flush()
        assert depth.depth("ha-depth-q").ready == 3
    finally:
        client.delete(*redis_priority_lists("ha-depth-q"))

    registry = CollectorRegistry()
    Counter("ha_cluster_test", "test", registry=registry).inc(2)
    mirror = CounterMirror(client, registry=registry, names={"ha_cluster_test_total": "ha"},
                           key=f"{prefix}:counters")
    assert mirror.flush() == 1  # MULTI/EXEC on one key: one slot
    assert read_cluster_counters(client, f"{prefix}:counters")["ha"] == [({}, 2.0)]

    times = ProcessingTimes(client, prefix=prefix)
    times.observe("payments", 0.5)
    times.observe("search", 1.5)  # another slot: the pipeline is not a transaction
    times.flush()
    assert times.mean("search") == 1.5
    assert store.clear() > 0  # SCAN over every master


def test_breaker_opened_in_one_process_rejects_in_the_others(cluster, monkeypatch):
    monkeypatch.setenv("TIDEGATE_STATE_TEST_URL", cluster.url)  # read by the spawned children
    prefix = _redis.new_prefix()
    cfg = {"minimum_calls": 5, "failure_rate": 0.5, "open_duration": 30.0}
    got = _redis.open_in_one_process(CTX, prefix, "payments", cfg, watchers=2, ready_s=60,
                                     collect_s=60)
    assert sorted(kind for kind, _ in got) == ["open", "open", "open"], got
    RedisStore(cluster.client(), prefix=prefix).clear()


def test_rate_limit_is_global_across_processes(cluster, monkeypatch):
    monkeypatch.setenv("TIDEGATE_STATE_TEST_URL", cluster.url)
    prefix = _redis.new_prefix()
    rate, burst, seconds = 50.0, 10, 2.0
    results, start = _redis.hammer_together(CTX, prefix, "global", rate, burst, seconds,
                                            processes=3, ready_s=60, collect_s=60)
    assert len(results) == 3
    _redis.check_global_limit(results, rate, burst, start, seconds)
    RedisStore(cluster.client(), prefix=prefix).clear()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_worker_keeps_its_state_on_the_cluster(cluster, broker, sims, policy_file,
                                                  start_worker):
    """A real Celery worker and producer with TIDEGATE_REDIS_URL=redis-cluster://...:
    charges run once each (idempotency marks on the cluster), duplicates are absorbed."""
    from producers import Producer
    from workers.application import create_app
    from workers.settings import load_settings

    app = create_app(load_settings(broker_url=broker.url, redis_url=cluster.url,
                                   policy_file=policy_file))
    try:
        producer = Producer(app)
        for i in range(10):
            producer.enqueue("payments.charge", [f"acct-{i}", 100], idempotency_key=f"ha-{i}",
                             priority="critical")
        producer.enqueue("payments.charge", ["acct-0", 100], idempotency_key="ha-0",
                         priority="critical")  # a duplicate
        start_worker("payments", env={"TIDEGATE_REDIS_URL": cluster.url})
        wait_until(lambda: sims["payments"].ledger()["applied"] == 10, 60,
                   message="ten charges applied")
        ledger = sims["payments"].ledger()
        assert all(ledger["effects"][f"ha-{i}"]["requests"] == 1 for i in range(10))
        client = cluster.client()
        marks = [k for k in client.scan_iter(match="tidegate:idem:payments.charge:key:ha-*")]
        assert len(marks) == 10
        # the worker's processing times reach the cluster within a second
        wait_until(lambda: client.llen("tidegate:autoscale:processing:payments") >= 10, 10,
                   message="processing times on the cluster")
    finally:
        app.close()


def test_a_masters_failover_is_survived(cluster):
    """Kill the master that owns a breaker: calls never fail (local state meanwhile), the
    replica takes the slots over, and the open breaker it had replicated is still open."""
    import redis

    client = cluster.client()
    prefix = _redis.new_prefix()
    store = RedisStore(client, prefix=prefix, retry_interval=0.2)
    cfg = BreakerConfig(minimum_calls=4, open_duration=600.0)
    store.breaker_force("payments", cfg, "open", 600.0)
    key = store.key("breaker", "payments", "state")
    port = _owner_port(client, key)
    master = redis.Redis(port=port, socket_timeout=2)
    replica_port = next(int(r["port"]) for r in master.info("replication").values()
                        if isinstance(r, dict) and "port" in r)
    replica = redis.Redis(port=replica_port, socket_timeout=2)
    replica.execute_command("READONLY")
    assert wait_until(lambda: replica.exists(key), timeout=10), "never replicated"
    # a key owned by another master, to show it stays usable during the failover
    other = next(n for n in ("search", "email", "a", "b", "c", "d", "e", "f")
                 if _owner_port(client, store.key("ratelimit", n)) != port)

    os.kill(cluster.pid(port), signal.SIGKILL)
    killed = time.monotonic()
    errors, local, other_ok = 0, 0, 0
    promoted = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            snap = store.breaker_read("payments", cfg)
            local += store.degraded
            other_ok += store.gcra(other, 1000.0, 1000)[0] and not store.degraded
        except Exception:  # what the test counts: nothing may escape
            errors += 1
        with contextlib.suppress(redis.RedisError):
            promoted = replica.info("replication")["role"] == "master"
        if promoted and not store.degraded and snap.state == "open":
            print(f"failover: shared again {time.monotonic() - killed:.1f} s after the kill")
            break
        time.sleep(0.05)
    assert errors == 0
    assert promoted, "the replica was never promoted"
    assert not store.degraded and store.breaker_read("payments", cfg).state == "open"
    assert _owner_port(client, key) == replica_port
    assert local > 0, "the store never noticed the master was gone"
    assert other_ok > 0, "the other masters' keys were unusable during the failover"
    store.clear()


def test_a_cluster_down_at_start_up_never_fails_a_call():
    """RedisCluster connects in its constructor; the store must still start and fall back."""
    dead = redis_client(f"redis-cluster://127.0.0.1:{_base_port()}", socket_timeout=0.1,
                        socket_connect_timeout=0.1)
    store = RedisStore(dead, prefix="down", name="cluster-down-test")
    b = CircuitBreaker("down", BreakerConfig(minimum_calls=3), store)
    assert b.call(lambda: 1) == 1
    assert store.degraded
    for _ in range(3):
        with pytest.raises(TransientError):
            b.call(lambda: (_ for _ in ()).throw(TransientError("x")))
    with pytest.raises(CircuitOpen):
        b.call(lambda: 1)  # still protects, on local state
