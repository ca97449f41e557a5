"""examples/shop end to end on real Redis: a Celery project of its own with Tidegate installed.

The worker is ``celery -A shop worker`` started from ``examples/``; jobs go in through
``tidegate enqueue --app shop`` and ``tidegate api --app shop``; the dead letters are read with
``tidegate dlq list --app shop``. Nothing here imports the shop into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL
from tidegate.stack import BIN, ROOT, Proc, Sim, Worker, free_port, wait_until, write_policy

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples"
TOKEN = "shop-test-token"


@dataclass(frozen=True)
class Shop:
    env: dict[str, str]
    policy: Path
    sims: dict[str, Sim]
    worker: Worker
    tmp: Path

    def tidegate(self, *argv: str) -> subprocess.CompletedProcess[str]:
        # cwd is not examples/: the app is found through PYTHONPATH, as in a deployment
        return subprocess.run([str(BIN / "tidegate"), *argv], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)

    def dead_letters(self, queue: str) -> list[dict]:
        out = self.tidegate("dlq", "list", queue, "--app", "shop", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture(scope="module")
def shop_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    tmp = tmp_path_factory.mktemp("shop-sims")
    sims = {name: Sim(name, tmp) for name in ("inventory", "payments")}
    yield sims
    for sim in sims.values():
        sim.stop()


@pytest.fixture
def shop(shop_sims, redis_up, state_redis, tmp_path) -> Iterator[Shop]:
    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    for sim in shop_sims.values():
        sim.reset()
    policy = write_policy(shop_sims, tmp_path / "policy.toml",
                          source=EXAMPLES / "shop" / "policy.toml")
    env = {
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)]),
        "TIDEGATE_BROKER_URL": REDIS_BROKER_URL,
        "TIDEGATE_REDIS_URL": STATE_REDIS_URL,
        "TIDEGATE_POLICY_FILE": str(policy),
    }
    worker = Worker("inventory,payments", env, tmp_path, app="shop", cwd=EXAMPLES,
                    concurrency=2)
    try:
        worker.wait_ready()
        yield Shop(env, policy, shop_sims, worker, tmp_path)
    finally:
        worker.stop()


def _effect(sim: Sim, key: str) -> dict | None:
    return sim.ledger()["effects"].get(key)


def test_shop_jobs_from_the_cli_and_the_api_run_on_the_shops_own_worker(shop):
    out = shop.tidegate("enqueue", "--app", "shop", "inventory.reserve", "--kwargs",
                        '{"order_id": "o-1", "sku": "mug", "quantity": 2}', "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["queue"] == "inventory"
    effect = wait_until(lambda: _effect(shop.sims["inventory"], "reserve:o-1:mug"), 30,
                        message="the reservation")
    assert effect["payload"] == {"order_id": "o-1", "sku": "mug", "quantity": 2}

    port = free_port()
    api = Proc([str(BIN / "tidegate"), "api", "--app", "shop", "--port", str(port)],
               {**shop.env, "TIDEGATE_API_TOKENS": TOKEN}, shop.tmp / "api.log", "api",
               cwd=shop.tmp)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60,
                   interval=0.2, message="tidegate api --app shop")
        r = httpx.post(f"{base}/v1/jobs", timeout=10, headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"task": "payments.capture", "args": ["o-1", 2400],
                             "idempotency_key": "capture-o-1"})
        assert r.status_code == 202, r.text
        assert r.json()["queue"] == "payments"
        unknown = httpx.post(f"{base}/v1/jobs", timeout=10,
                             headers={"Authorization": f"Bearer {TOKEN}"},
                             json={"task": "payments.refund", "args": []})
        assert unknown.status_code == 422 and "payments.capture" in unknown.text
    finally:
        api.stop()
    effect = wait_until(lambda: _effect(shop.sims["payments"], "capture-o-1"), 30,
                        message="the capture")
    assert effect["payload"] == {"order_id": "o-1", "amount_cents": 2400}
    assert shop.worker.alive()
    depth = shop.tidegate("-A", "shop", "depth", "--json")  # the option before the command
    assert depth.returncode == 0, depth.stderr
    assert [q["name"] for q in json.loads(depth.stdout)["queues"]] == [
        "inventory", "payments", "default"]


def test_a_failed_capture_is_dead_lettered_and_a_retried_reservation_applies_once(shop):
    # payments is not idempotent: a capture that failed after the call is not tried again
    shop.sims["payments"].control(mode="down")
    out = shop.tidegate("enqueue", "--app", "shop", "payments.capture", "--args", '["o-2", 990]')
    assert out.returncode == 0, out.stderr
    [record] = wait_until(lambda: shop.dead_letters("payments"), 30, interval=0.2,
                          message="the capture in payments.dlq")
    assert record["task"] == "payments.capture" and record["args"] == ["o-2", 990]
    assert record["reason"] == "transient_failure_not_idempotent"
    assert shop.sims["payments"].ledger()["applied"] == 0

    # inventory is idempotent: the first call applies the reservation and answers 503, so it
    # is retried; the retry meets the key already applied and the effect stays single
    inventory = shop.sims["inventory"]
    inventory.control(mode="failing", apply_then_fail=True)
    out = shop.tidegate("enqueue", "--app", "shop", "inventory.reserve", "--args",
                        '["o-3", "lamp"]', "--idempotency-key", "reserve-o-3")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: (_effect(inventory, "reserve-o-3") or {}).get("requests", 0) >= 2, 30,
               interval=0.02, message="a retried reservation")
    inventory.control(mode="healthy")
    wait_until(lambda: inventory.ledger()["duplicates"] >= 1, 60, interval=0.1,
               message="a retry answered with the first result")
    ledger = inventory.ledger()
    assert ledger["applied"] == 1 and list(ledger["effects"]) == ["reserve-o-3"]
    assert ledger["effects"]["reserve-o-3"]["requests"] >= 3
    assert shop.dead_letters("inventory") == []


def test_a_task_the_shops_worker_does_not_know_is_dead_lettered_not_dropped(shop):
    """Another service's app publishes onto the shop's queue a task the shop does not have."""
    from workers.installation import install
    from workers.settings import load_settings

    other = Celery("other-service", set_as_current=False)
    install(other, load_settings(broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL,
                                 policy_file=shop.policy))
    other.send_task("inventory.restock", args=["mug", 40], queue="inventory")
    [record] = wait_until(lambda: shop.dead_letters("inventory"), 30, interval=0.2,
                          message="the unknown task in inventory.dlq")
    assert record["reason"] == "unknown_task" and record["task"] == "inventory.restock"
    assert "inventory.restock" in record["exception_message"]
    assert shop.worker.alive()


def test_producer_and_async_producer_on_another_app_installed_with_the_shops_policy(
        shop, monkeypatch):
    """A client service's own app: Producer(app) and AsyncProducer(app), the task modules
    imported from the policy file's [app] include."""
    import asyncio

    from producers import AsyncProducer, Producer
    from workers.installation import install
    from workers.settings import load_settings

    monkeypatch.syspath_prepend(str(EXAMPLES))
    client = Celery("client-service", set_as_current=False)
    install(client, load_settings(broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL,
                                  policy_file=shop.policy))
    producer = Producer(client)
    assert {"inventory.reserve", "payments.capture"} <= set(producer.task_names())
    sync = producer.enqueue("inventory.reserve", ["o-4", "cup"])
    queued = asyncio.run(AsyncProducer(client).enqueue("inventory.reserve", ["o-5", "cup"],
                                                       priority="critical"))
    assert (sync.queue, queued.queue) == ("inventory", "inventory")
    wait_until(lambda: {"reserve:o-4:cup", "reserve:o-5:cup"}
               <= set(shop.sims["inventory"].ledger()["effects"]), 30,
               message="both reservations")
