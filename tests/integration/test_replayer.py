"""End to end on a moto SQS server: email down -> jobs deferred -> email back -> replayed once.

Redis broker only: these tests are long (moto serves ~30 receive+deletes/s), and the broker
side of the replay (``send_task``) is the same code the producer tests cover on both brokers.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from resilience.fallback import CallContext, QueueForLater
from tests.conftest import REDIS_BROKER_URL, STATE_REDIS_URL, sqs_env, tidegate_env
from tests.support.procs import BIN, Proc, wait_until
from workers.topology import redis_priority_lists

pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("broker", ["redis"], indirect=True)]

N = 200


def _settings(policy_file, moto, prefix):
    from workers.settings import load_settings

    return load_settings(broker_url=REDIS_BROKER_URL, redis_url=STATE_REDIS_URL,
                         policy_file=policy_file, sqs_endpoint_url=moto.url,
                         aws_access_key_id="testing", aws_secret_access_key="testing",
                         deferral_queue_prefix=prefix)


def _defer_jobs(sink, n: int, tag: str) -> list[str]:
    """n email jobs deferred the way the fallback does it; returns the addresses."""
    fallback = QueueForLater(sink)

    def one(i: int) -> str:
        to = f"{tag}{i}@example.com"
        key = None if i % 10 == 0 else f"{tag}-{i}"  # some get a key assigned by the store
        fallback.recover(CallContext("email", "email.send", (to, f"hello {i}"), {},
                                     idempotency_key=key, priority=2),
                         RuntimeError("email is down"))
        return to

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


class DepthSampler(threading.Thread):
    """Reads the email queue's ready depth on the broker until stopped; keeps the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5)
        self.max = 0
        self.samples = 0
        self.halt = threading.Event()

    def depth(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in redis_priority_lists("email"):
            pipe.llen(key)
        return sum(pipe.execute())

    def run(self) -> None:
        while not self.halt.is_set():
            self.max = max(self.max, self.depth())
            self.samples += 1
            self.halt.wait(0.01)


def _replayer(env: dict[str, str], tmp_path, name: str) -> Proc:
    return Proc([str(BIN / "tidegate"), "replayer", "--dependency", "email"], env,
                tmp_path / f"{name}.log", name)


def _stats(proc: Proc) -> dict:
    proc.stop()
    found = re.findall(r"replayer email stopped: (\{.*\})", proc.output())
    assert found, proc.output()[-3000:]
    return json.loads(found[-1])


def _assert_exactly_once(sim, addresses: list[str]) -> dict:
    ledger = sim.ledger()
    assert ledger["applied"] == len(addresses)
    sent_to = sorted(e["payload"]["to"] for e in ledger["effects"].values())
    assert sent_to == sorted(addresses)  # every job once: none lost, none applied twice
    return ledger


def test_email_down_defer_then_replay_exactly_once_under_watermark(
        broker, sims, policy_file, moto_sqs, deferral_prefix, start_worker, tmp_path):
    from workers.deferral import sink_for

    watermark = 40
    sims["email"].control(mode="down")
    sink = sink_for("email", _settings(policy_file, moto_sqs, deferral_prefix))
    addresses = _defer_jobs(sink, N, "a")
    assert sink.stats().total == N

    sampler = DepthSampler()
    sampler.start()
    env = tidegate_env(broker, policy_file, **sqs_env(moto_sqs, deferral_prefix),
                       TIDEGATE_REPLAY_MAX_QUEUE_DEPTH=str(watermark))
    replayer = _replayer(env, tmp_path, "replayer")
    try:
        # Down: the replayer watches and leaves every entry in SQS.
        wait_until(lambda: "replayer email: down" in replayer.output(), 60,
                   message="replayer sees email down")
        assert sampler.depth() == 0 and sink.stats().visible == N

        # Back, but no worker yet: the replayer fills the queue up to its watermark and stops.
        sims["email"].control(mode="healthy")
        wait_until(lambda: sampler.depth() >= watermark, 120, message="queue at watermark")
        assert sink.stats().total == N - sampler.depth()  # deleted only once published

        start_worker("email", concurrency=4, env=sqs_env(moto_sqs, deferral_prefix))
        wait_until(lambda: sims["email"].ledger()["applied"] == N, 240, interval=0.5,
                   message=f"{N} emails sent")
        wait_until(lambda: sink.stats().total == 0, 60, message="deferral queue empty")
    finally:
        sampler.halt.set()
        stats = _stats(replayer)
    ledger = _assert_exactly_once(sims["email"], addresses)
    assert sampler.samples > 100 and sampler.max <= watermark, sampler.max
    assert stats["published"] == N and stats["deleted"] == N and stats["poison"] == 0
    assert ledger["requests"] == N  # one replayer, healthy dependency: no duplicate at all


def test_two_replayers_still_exactly_once(broker, sims, policy_file, moto_sqs,
                                          deferral_prefix, start_worker, tmp_path):
    from workers.deferral import sink_for

    sink = sink_for("email", _settings(policy_file, moto_sqs, deferral_prefix))
    addresses = _defer_jobs(sink, N, "b")
    start_worker("email", concurrency=4, env=sqs_env(moto_sqs, deferral_prefix))
    env = tidegate_env(broker, policy_file, **sqs_env(moto_sqs, deferral_prefix))
    first, second = _replayer(env, tmp_path, "r1"), _replayer(env, tmp_path, "r2")
    try:
        wait_until(lambda: sims["email"].ledger()["applied"] == N, 240, interval=0.5,
                   message=f"{N} emails sent")
        wait_until(lambda: sink.stats().total == 0, 60, message="deferral queue empty")
    finally:
        stats = [_stats(first), _stats(second)]
    _assert_exactly_once(sims["email"], addresses)
    # An entry whose visibility ran out while one replayer held it (a loaded machine) is
    # received, published and deleted by the other too: a duplicate publish and delete are
    # allowed, never a duplicate effect (asserted above through the ledger).
    deleted, published = (sum(s[k] for s in stats) for k in ("deleted", "published"))
    assert N <= deleted <= published
