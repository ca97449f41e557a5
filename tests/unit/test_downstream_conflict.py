"""A 409 for a keyed request means "that key is still in progress at the provider": an
InProgress refusal (retry later for the first request's outcome), never a permanent failure."""

from __future__ import annotations

import httpx
import pytest

from resilience.errors import InProgress, PermanentError, RejectedError
from workers.downstream import DownstreamClient, DownstreamRejected
from workers.settings import Settings


def _client(status: int, headers: dict[str, str] | None = None) -> DownstreamClient:
    client = DownstreamClient("payments", "http://sim", Settings())
    client._http = httpx.Client(base_url="http://sim", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, json={"detail": "x"}, headers=headers or {})))
    return client


def test_409_with_a_key_is_in_progress_with_its_retry_after() -> None:
    with pytest.raises(InProgress) as caught:
        _client(409, {"Retry-After": "2"}).post("/effects/charge", {}, idempotency_key="k")
    assert isinstance(caught.value, RejectedError) and caught.value.retry_after == 2.0
    assert caught.value.dependency == "payments"


def test_409_without_a_key_stays_a_permanent_refusal() -> None:
    with pytest.raises(DownstreamRejected) as caught:
        _client(409).post("/effects/charge", {})
    assert isinstance(caught.value, PermanentError)
