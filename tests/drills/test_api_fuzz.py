"""Fault drill: fuzz the HTTP API from its own OpenAPI schema (schemathesis).

The real ``tidegate api`` subprocess (uvicorn, as in production) on a free loopback port, a
bearer token from ``TIDEGATE_API_TOKENS``, Redis as broker and state. Every operation in
``/openapi.json`` gets schema-valid (positive) and schema-breaking (negative) inputs, sent
authenticated. The promise: no input makes the service answer 5xx, and every answer conforms
to the schema (status declared, content type, body and headers) where that is checkable.

Watermarks and the per-client rate are raised out of reach: a 503 for backpressure or a 429
is correct behaviour (tests/integration/test_api.py covers them), here it would hide a crash.
One 503 stays reachable and is counted apart ("503 shed"): a generated ``deadline_ms`` of a
few milliseconds is shorter than the publish lane's wait, and the job is refused at once.
A second test sends what no schema describes (raw bytes, any JSON, nesting at any depth, odd
content types): the same no-5xx promise. Bounded: ``50 x TIDEGATE_DRILL_SCALE`` examples
per operation and mode (four times that for the raw bodies), 10 s per request.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_BROKER_URL, Broker, tidegate_env
from tests.support.api import tidegate_api

pytestmark = [pytest.mark.integration, pytest.mark.drill]
SCALE = float(os.environ.get("TIDEGATE_DRILL_SCALE", "1"))
EXAMPLES = max(10, int(50 * SCALE))
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OUT_OF_REACH = """
[backpressure]
low_watermark = 1000000
high_watermark = 2000000
"""


@pytest.fixture
def api_url(redis_up, policy_file: Path, tmp_path: Path, state_redis) -> Iterator[str]:
    """``tidegate api`` on a free port, its broker database emptied first."""
    import redis

    redis.Redis.from_url(REDIS_BROKER_URL, socket_timeout=5).flushdb()
    policy = tmp_path / "policy-fuzz.toml"
    policy.write_text(policy_file.read_text() + OUT_OF_REACH)
    env = tidegate_env(Broker("redis", REDIS_BROKER_URL), policy, TIDEGATE_API_TOKENS=TOKEN,
                       TIDEGATE_API_CLIENT_RATE_PER_S="1000000",
                       TIDEGATE_API_CLIENT_BURST="1000000")
    with tidegate_api(env, tmp_path / "api.log") as (url, proc):
        yield url
    assert "Traceback" not in proc.output(), proc.output()[-5000:]


def _checks() -> list:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_headers_conformance, response_schema_conformance]


def _real_job():
    """A registered task with arguments that fit it: schema-valid bodies almost never name a
    real task, and without these the enqueue path behind validation would go untested."""
    from hypothesis import strategies as st

    text = st.text(min_size=1, max_size=40)
    return st.one_of(
        st.tuples(st.just("search.index"), st.tuples(text)),
        st.tuples(st.just("email.send"), st.tuples(text, text)),
        st.tuples(st.just("payments.charge"), st.tuples(text, st.integers(0, 10**9))),
    )


def _realistic(body, jobs: list[tuple[str, tuple]]) -> None:
    """Give each generated job (single or batch) a real task; keep its other fields."""
    items = body.get("jobs") if isinstance(body, dict) and "jobs" in body else [body]
    for item, (task, args) in zip(items if isinstance(items, list) else [], jobs, strict=False):
        if isinstance(item, dict):
            item.update(task=task, args=list(args), kwargs={})
            item.pop("queue", None)


def _shed(response) -> bool:
    """The API's own refusal, not a crash: a job whose ``deadline_ms`` is shorter than the
    publish lane's wait is shed with 503 + Retry-After at once (producers/admission.py)."""
    if response.status_code != 503 or "retry-after" not in response.headers:
        return False
    try:
        return response.json().get("error") == "shed"
    except ValueError:
        return False


def _fuzz(operation, mode, base_url: str, statuses: Counter) -> None:
    """Up to EXAMPLES generated requests against one operation, each response validated."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    checks = _checks()
    real = mode is GenerationMode.POSITIVE and operation.method.upper() == "POST"

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case, data) -> None:
        if real and data.draw(st.booleans(), label="real tasks"):
            _realistic(case.body, data.draw(st.lists(_real_job(), max_size=20), label="jobs"))
        response = case.call(base_url=base_url, headers=AUTH, timeout=10)
        shed = _shed(response)
        statuses[(operation.label, mode.value, "503 shed" if shed else response.status_code)] += 1
        case.validate_response(response, headers=AUTH, checks=[
            c for c in checks if not (shed and c.__name__ == "not_a_server_error")])
        if operation.label == "POST /v1/jobs/batch" and response.status_code == 200:
            items = response.json()["results"]
            for r in items:  # a job shed for its own short deadline_ms, as a single one is
                shed_item = r["status"] == 503 and r.get("error") == "shed" \
                    and r.get("retry_after_s")
                statuses[("batch item", mode.value, "503 shed" if shed_item else r["status"])] += 1
                assert r["status"] < 500 or shed_item, items

    run()


def test_no_5xx_and_answers_conform_to_the_schema(api_url: str) -> None:
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/jobs", "POST /v1/jobs/batch",
                                               "GET /v1/queues", "GET /healthz"}
    statuses: Counter = Counter()
    failures: list[str] = []
    started = time.monotonic()
    for operation in operations:
        # Negative inputs need something to break: a body or a parameter.
        breakable = any(len(p) for p in (operation.body, operation.query, operation.headers,
                                         operation.path_parameters))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if breakable else [])
        for mode in modes:
            try:
                _fuzz(operation, mode, api_url, statuses)
            except (Exception, BaseExceptionGroup) as exc:  # every operation; all failures
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    elapsed = time.monotonic() - started
    total = sum(n for (label, _, _), n in statuses.items() if label != "batch item")
    print(f"\nfuzz: {total} requests over {len(operations)} operations in {elapsed:.1f} s")
    for (label, mode, status), n in sorted(statuses.items(), key=str):
        print(f"  {label:<22} {mode:<9} {status}: {n}")
    assert not failures, "\n\n".join(failures)
    assert not [k for k in statuses if isinstance(k[2], int) and k[2] >= 500]
    accepted = sum(n for (label, _, status), n in statuses.items()
                   if label in ("POST /v1/jobs", "batch item") and status == 202)
    refused = sum(n for (label, _, status), n in statuses.items()
                  if label == "POST /v1/jobs" and 400 <= status < 500)
    assert accepted and refused, "the fuzz reached both the enqueue path and the refusals"


def _hostile_body():
    """Bodies no schema generator would write: any JSON, deep nesting, raw bytes."""
    import json

    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    any_json = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=30)
    job_with = any_json.map(lambda v: json.dumps({"task": "search.index", "args": [v],
                                                  "kwargs": {"x": v}}).encode())
    nested = st.tuples(st.integers(1, 3000), st.sampled_from(["[", '{"a":'])).map(
        lambda t: (t[1] * t[0] + ("]" * t[0] if t[1] == "[" else "1" + "}" * t[0])).encode())
    deep_job = nested.map(lambda b: b'{"task":"search.index","args":[' + b + b"]}")
    return st.one_of(any_json.map(lambda v: json.dumps(v).encode()), job_with, nested,
                     deep_job, st.binary(max_size=512))


def test_no_5xx_for_bodies_outside_the_schema(api_url: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    statuses: Counter = Counter()
    with httpx.Client(base_url=api_url, timeout=10) as http:

        @settings(max_examples=EXAMPLES * 4, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=_hostile_body(), path=st.sampled_from(["/v1/jobs", "/v1/jobs/batch"]),
               batch_wrap=st.booleans(),
               content_type=st.sampled_from(["application/json", "text/plain", "", "x/y"]))
        def run(body: bytes, path: str, batch_wrap: bool, content_type: str) -> None:
            if path.endswith("batch") and batch_wrap:
                body = b'{"jobs":[' + body + b"]}"
            headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
            response = http.post(path, content=body, headers=headers)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (path, body[:200], response.text[:300])

        run()
    print(f"\nhostile bodies: {sum(statuses.values())} requests, statuses {dict(statuses)}")
