"""Deeply nested JSON bodies are a 422, not a 500 (found by the fuzz drill's hostile bodies).

Near Python's recursion limit ``json.loads`` raised RecursionError (not a ValueError); a little
below it parsing succeeded and validation or serialisation recursed out instead. Both answered
500. The refusal happens before anything is enqueued, so no service is needed here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

AUTH = {"Authorization": "Bearer t", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client() -> Iterator:
    from fastapi.testclient import TestClient

    from producers import Producer
    from producers.api import create_api
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url="redis://127.0.0.1:1/0",
                             redis_url="redis://127.0.0.1:1/0", api_tokens="t")
    app = create_app(settings)
    yield TestClient(create_api(Producer(app)), raise_server_exceptions=False)
    app.close()


def _nested(depth: int, where: str) -> str:
    inner = "[" * depth + "]" * depth if where == "args" else '{"x":' * depth + "1" + "}" * depth
    value = f"[{inner}]" if where == "args" else inner
    return f'{{"task":"search.index","{where}":{value}}}'


@pytest.mark.parametrize("where", ["args", "kwargs"])
@pytest.mark.parametrize("depth", [65, 500, 963, 966, 990, 5000, 40_000])
def test_deep_nesting_is_refused_with_422(client, depth: int, where: str) -> None:
    body = _nested(depth, where)
    single = client.post("/v1/jobs", content=body, headers=AUTH)
    batch = client.post("/v1/jobs/batch", content=f'{{"jobs":[{body}]}}', headers=AUTH)
    for response in (single, batch):
        assert response.status_code in (413, 422), response.text[:200]
        if response.status_code == 422:
            assert response.json()["error"] == "invalid_json"


def test_nesting_limit_counts_arrays_and_objects_without_recursing() -> None:
    from producers.api import MAX_NESTING, _nesting_exceeds

    assert not _nesting_exceeds({"a": [[1, {"b": []}]]}, 5)  # object, 2 arrays, object, array
    assert _nesting_exceeds({"a": [[1, {"b": []}]]}, 4)
    deep: list = []
    for _ in range(100_000):  # far past the recursion limit: must not raise
        deep = [deep]
    assert _nesting_exceeds(deep, MAX_NESTING)
    assert not _nesting_exceeds("scalar", 0)


@pytest.mark.parametrize("priority", ["true", "1.0", '"urgent"', "7", "null"])
def test_priority_must_be_a_name_or_0_to_3(client, priority: str) -> None:
    body = f'{{"task":"search.index","args":["d"],"priority":{priority}}}'
    response = client.post("/v1/jobs", content=body, headers=AUTH)
    assert response.status_code == 422, response.text[:300]
    assert "priority" in response.text
