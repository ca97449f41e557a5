"""The HTTP service against real Redis/RabbitMQ: every status code and its Retry-After."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import STATE_REDIS_URL, tidegate_env
from tests.support.api import tidegate_api
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration

TOKEN = "test-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOW, HIGH = 5, 10


@pytest.fixture
def api_policy(policy_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "policy-api.toml"
    path.write_text(policy_file.read_text() + f"""
[backpressure.search]
low_watermark = {LOW}
high_watermark = {HIGH}
""")
    return path


def _client(broker, api_policy, state_redis, **api_kw) -> tuple[httpx.Client, object]:
    from fastapi.testclient import TestClient

    from producers import Producer
    from producers.api import ApiSettings, create_api
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url=broker.url, redis_url=STATE_REDIS_URL,
                             policy_file=api_policy, api_tokens=f"{TOKEN},other-token",
                             api_max_body_bytes=2048)
    app = create_app(settings)
    api = create_api(Producer(app), api_settings=ApiSettings(**api_kw))
    return TestClient(api), app


@pytest.fixture
def client(broker, api_policy, state_redis):
    c, app = _client(broker, api_policy, state_redis)
    with c:
        yield c
    app.close()


def job(**kw):
    return {"task": "search.index", "args": ["doc-1"], **kw}


def test_202_with_id_state_and_queue(client, broker, policy_file):
    from workers.depth import probe_for
    from workers.settings import load_settings

    r = client.post("/v1/jobs", json=job(priority="medium", deadline_ms=5000), headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued" and body["queue"] == "search" and body["id"]
    truth = probe_for(load_settings(broker_url=broker.url, policy_file=policy_file))
    assert truth.depth("search").ready == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic dGVzdA=="},
                                     {"Authorization": "Bearer "}])
def test_401_without_a_valid_token(client, headers):
    r = client.post("/v1/jobs", json=job(), headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/v1/queues", headers=headers).status_code == 401


@pytest.mark.parametrize(("body", "field"), [
    ({"args": []}, "task"),
    (job(priority="urgent"), "priority"),
    (job(args="not-a-list"), "args"),
    (job(kwargs=[1]), "kwargs"),
    (job(deadline_ms=0), "deadline_ms"),
    (job(idempotency_key=""), "idempotency_key"),
    (job(colour="red"), "colour"),
    (job(task="search.nope"), "task"),
    (job(queue="nope"), "queue"),
])
def test_422_names_the_field(client, body, field):
    r = client.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert field in r.json()["message"] or field in ("task", "queue")


def test_422_for_a_body_that_is_not_json(client):
    r = client.post("/v1/jobs", content=b"{not json", headers={**AUTH,
                                                               "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_json"


def test_413_by_content_length_and_by_actual_size(client):
    big = job(args=["x" * 5000])
    r = client.post("/v1/jobs", json=big, headers=AUTH)
    assert r.status_code == 413

    def chunks():  # no Content-Length: the service must count what it reads
        yield b'{"task": "search.index", "args": ["'
        for _ in range(10):
            yield b"y" * 500
        yield b'"]}'

    r = client.post("/v1/jobs", content=chunks(), headers={**AUTH,
                                                          "Content-Type": "application/json"})
    assert r.status_code == 413


def test_429_with_retry_after_when_the_client_is_over_its_rate(broker, api_policy,
                                                               state_redis):
    c, app = _client(broker, api_policy, state_redis, client_rate_per_s=0.5, client_burst=2)
    with c:
        codes = [c.post("/v1/jobs", json=job(), headers=AUTH) for _ in range(4)]
        assert [r.status_code for r in codes[:2]] == [202, 202]
        limited = [r for r in codes if r.status_code == 429]
        assert limited
        # 0.5/s: the next request is allowed within 2 s
        assert 1 <= int(limited[0].headers["Retry-After"]) <= 2
        # another token is another client with its own budget
        r = c.post("/v1/jobs", json=job(), headers={"Authorization": "Bearer other-token"})
        assert r.status_code == 202
    app.close()


def test_503_with_retry_after_when_shed_and_critical_still_accepted(client, broker, policy_file):
    codes = []
    for i in range(HIGH + 5):
        r = client.post("/v1/jobs", json=job(args=[f"d{i}"], priority="low"), headers=AUTH)
        codes.append(r.status_code)
    assert 503 in codes and codes[0] == 202
    # LOW is admitted with falling probability up to low + span/2 = 7.5, so the loop can stop
    # at depth 6 or 7 where a further LOW may still pass. HIGH is admitted with p = 1 up to
    # 7.5: top up with it to depth 8, where LOW's probability is exactly 0.
    from workers.depth import probe_for
    from workers.settings import load_settings

    truth = probe_for(load_settings(broker_url=broker.url, policy_file=policy_file))
    for i in range(HIGH):
        if truth.depth("search").ready >= 8:
            break
        r = client.post("/v1/jobs", json=job(args=[f"h{i}"], priority="high"), headers=AUTH)
        assert r.status_code == 202, r.text
    wait_until(lambda: truth.depth("search").ready >= 8, 10, message="search depth >= 8")
    r = client.post("/v1/jobs", json=job(priority="low"), headers=AUTH)
    assert r.status_code == 503
    # nothing drains the queue (no worker): Retry-After is the configured maximum, not 1 s
    assert int(r.headers["Retry-After"]) >= 60
    assert r.json()["error"] == "backpressure"
    for _ in range(3):
        r = client.post("/v1/jobs", json=job(priority="critical"), headers=AUTH)
        assert r.status_code == 202


def test_503_when_the_broker_is_unreachable(api_policy, state_redis):
    from fastapi.testclient import TestClient

    from producers import Producer
    from producers.api import create_api
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url="redis://127.0.0.1:1/0", redis_url=STATE_REDIS_URL,
                             policy_file=api_policy, api_tokens=TOKEN, connect_timeout_s=0.5)
    app = create_app(settings)
    with TestClient(create_api(Producer(app))) as c:
        r = c.post("/v1/jobs", json=job(), headers=AUTH)
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["state_redis"] == "ok"
        assert c.get("/healthz").status_code == 200
    app.close()


def test_same_idempotency_key_returns_the_first_job(client, broker, policy_file):
    from workers.depth import probe_for
    from workers.settings import load_settings

    # CRITICAL: five HIGH jobs at once on a loaded machine may rightly be shed (their expected
    # wait for a publish thread); this test is about the key, not about shedding
    body = job(idempotency_key="order-42", priority="critical")
    results: list[httpx.Response] = []

    def post() -> None:
        results.append(client.post("/v1/jobs", json=body, headers=AUTH))

    threads = [threading.Thread(target=post) for _ in range(5)]  # concurrent repeats
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {r.status_code for r in results} == {202}, [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in results) == 4
    truth = probe_for(load_settings(broker_url=broker.url, policy_file=policy_file))
    assert truth.depth("search").ready == 1  # one job, not five

    changed = client.post("/v1/jobs", json=job(idempotency_key="order-42", args=["other"]),
                          headers=AUTH)
    assert changed.status_code == 422 and changed.json()["field"] == "idempotency_key"
    # the same key from another client is another job
    other = client.post("/v1/jobs", json=body, headers={"Authorization": "Bearer other-token"})
    assert other.status_code == 202 and other.json()["id"] != results[0].json()["id"]


def test_refused_idempotent_request_can_be_retried(client):
    """A 503 must not leave the key pointing at a job that was never queued."""
    for i in range(HIGH + 2):
        client.post("/v1/jobs", json=job(args=[f"f{i}"], priority="critical"), headers=AUTH)
    body = job(idempotency_key="retry-me", priority="high")
    assert client.post("/v1/jobs", json=body, headers=AUTH).status_code == 503
    assert client.post("/v1/jobs", json=body, headers=AUTH).status_code == 503  # not replayed
    # the key was released, so the client may send the job again, e.g. as critical
    first = client.post("/v1/jobs", json={**body, "priority": "critical"}, headers=AUTH)
    again = client.post("/v1/jobs", json={**body, "priority": "critical"}, headers=AUTH)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]


def test_batch_gives_one_status_per_job(client):
    r = client.post("/v1/jobs/batch", headers=AUTH, json={"jobs": [
        job(args=["b1"]), {"task": "nope.x"}, job(args=["b2"], priority=9)]})
    assert r.status_code == 200
    statuses = [x["status"] for x in r.json()["results"]]
    assert statuses == [202, 422, 422]
    assert r.json()["results"][2]["field"] == "priority"


def test_batch_publishes_together_and_says_which_jobs_are_in(client, broker, policy_file):
    """Throttle, validation and idempotency per job; the broker holds exactly the 202s."""
    from workers.depth import probe_for
    from workers.settings import load_settings

    jobs = [job(args=[f"low-{i}"], priority="low") for i in range(12)]
    jobs[2] = {"task": "nope.x"}
    jobs += [job(args=["vip"], priority="critical", idempotency_key="vip-1"),
             job(args=["vip"], priority="critical", idempotency_key="vip-1")]
    r = client.post("/v1/jobs/batch", headers=AUTH, json={"jobs": jobs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    statuses = [x["status"] for x in results]
    assert statuses[2] == 422 and statuses[-2:] == [202, 202]
    assert results[-1]["id"] == results[-2]["id"]  # the repeat is the same job
    low = [s for k, s in enumerate(statuses[:12]) if k != 2]
    assert set(low) <= {202, 503} and low[:LOW - 1] == [202] * (LOW - 1)
    # LOW is never admitted from low + span/2, the batch's own jobs counted
    assert low.count(202) <= LOW + (HIGH - LOW) // 2 + 1
    assert all(x["error"] == "backpressure" for x in results[:12] if x["status"] == 503)
    truth = probe_for(load_settings(broker_url=broker.url, policy_file=policy_file))
    assert truth.depth("search").ready == low.count(202) + 1


def test_queues_health_metrics_and_docs(client):
    client.post("/v1/jobs", json=job(), headers=AUTH)

    def queues():
        return {q["queue"]: q for q in client.get("/v1/queues", headers=AUTH).json()["queues"]}

    # readings are shared and cached for a fraction of a second
    wait_until(lambda: queues()["search"]["ready"] == 1, 10, message="search depth 1")
    queues = queues()
    assert queues["search"]["high_watermark"] == HIGH
    assert set(queues) >= {"payments", "search", "email", "default"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    assert "tidegate_producer_enqueued_total" in text and "tidegate_api_requests_total" in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"]


def test_tidegate_api_command_serves(broker, api_policy, state_redis, tmp_path):
    env = tidegate_env(broker, api_policy, TIDEGATE_API_TOKENS=TOKEN)
    with tidegate_api(env, tmp_path / "api.log") as (base, proc):
        r = httpx.post(f"{base}/v1/jobs", json=job(), headers=AUTH, timeout=10)
        assert r.status_code == 202, r.text
        assert httpx.post(f"{base}/v1/jobs", json=job(), timeout=10).status_code == 401
        assert TOKEN not in proc.output()  # the token never reaches the log
