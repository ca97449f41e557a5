"""``POST /v1/jobs`` is served by plain ASGI (producers/http_fast.py), not the FastAPI route:
both must answer every request the same way, byte for byte where nothing random is in it."""

from __future__ import annotations

import re

import pytest

from tests.integration.test_api import AUTH, _client, api_policy  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

BIG = {"task": "search.index", "args": ["x" * 4096]}
CASES = [
    ("no token", {}, {"task": "search.index"}, None),
    ("bad token", {"Authorization": "Bearer nope"}, {"task": "search.index"}, None),
    ("not json", AUTH, None, b"{not json"),
    ("not an object", AUTH, None, b"[1, 2]"),
    ("unknown task", AUTH, {"task": "no.such.task"}, None),
    ("unknown field", AUTH, {"task": "search.index", "colour": "red"}, None),
    ("bad priority", AUTH, {"task": "search.index", "priority": "urgent"}, None),
    ("unknown queue", AUTH, {"task": "search.index", "queue": "nope"}, None),
    ("too big", AUTH, BIG, None),
    ("bad length", {**AUTH, "Content-Length": "abc"}, None, b"{}"),
    ("accepted", AUTH, {"task": "search.index", "args": ["d"], "priority": "critical"}, None),
]


def _answer(client, headers, body, raw):
    r = client.post("/v1/jobs", json=body, content=raw, headers={
        "Content-Type": "application/json", **headers})
    text = re.sub(r'"id":"[0-9a-f-]{36}"', '"id":"<id>"', r.text)
    kept = {k: v for k, v in r.headers.items() if k not in ("date", "server")}
    return r.status_code, text, kept


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_the_fast_path_answers_as_the_route_does(case, broker, api_policy,  # noqa: F811
                                                 state_redis):
    _, headers, body, raw = next(c for c in CASES if c[0] == case)
    c, app = _client(broker, api_policy, state_redis)
    try:
        with c:
            assert c.app.fast_path is not None
            before = c.get("/metrics").text
            fast = _answer(c, headers, body, raw)
            c.app.fast_path = None  # FastAPI's route, as mounted without TidegateAPI
            routed = _answer(c, headers, body, raw)
            after = c.get("/metrics").text
    finally:
        app.close()
    assert fast == routed
    assert fast[0] != 500
    # both counted under the route's own label (the registry is the process's: a difference)
    assert _count(after, fast[0]) - _count(before, fast[0]) == 2


def _count(metrics: str, status: int) -> float:
    found = re.search(rf'^tidegate_api_requests_total\{{route="/v1/jobs",status="{status}"\}} '
                      r'(\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0
