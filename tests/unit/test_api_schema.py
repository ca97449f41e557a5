"""The API's OpenAPI document says what the service really answers (found by the fuzz drill).

Clients and fuzzers generate from this document, so an undocumented content type or status
is a bug even when the service behaves: /metrics is Prometheus text, /readyz may say 503,
/v1/queues may say 401. Nothing here connects anywhere (Redis and the broker are lazy).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    from producers import Producer
    from producers.api import create_api
    from workers.application import create_app
    from workers.settings import load_settings

    settings = load_settings(broker_url="redis://127.0.0.1:1/0",
                             redis_url="redis://127.0.0.1:1/0", api_tokens="t")
    app = create_app(settings)
    try:
        return create_api(Producer(app)).openapi()
    finally:
        app.close()


def test_metrics_is_documented_as_text_plain(openapi: dict[str, Any]) -> None:
    content = openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/plain"}


def test_every_status_the_service_answers_is_documented(openapi: dict[str, Any]) -> None:
    def statuses(path: str, method: str) -> set[str]:
        return set(openapi["paths"][path][method]["responses"])

    assert statuses("/readyz", "get") >= {"200", "503"}
    assert statuses("/v1/queues", "get") >= {"200", "401"}
    assert statuses("/v1/jobs", "post") >= {"202", "401", "409", "413", "422", "429", "503"}
