"""HTTP calls from tasks to their dependencies, with timeouts that follow the deadline.

Errors are sorted into the one tree: connection problems, timeouts, 429 and 5xx are
transient (worth retrying if the work is idempotent); a 409 for a request that carries an
idempotency key is :class:`~resilience.errors.InProgress` (an earlier request with that key
is still running at the provider: nothing applied, ask again later); other 4xx are permanent.

A pooled connection is dropped once idle ``downstream_keepalive_s`` (1 s), before the server
drops it (httpx keeps one 5 s, exactly uvicorn's limit): a request written on a connection the
server is closing at that moment is reset unread, and for a charge without a key that is a
failure after sending, dead-lettered as "may have been charged" (seen in the connection-loss
drill: a prefork child's connection idle ~4.9 s).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import httpx

from resilience.deadline import client_timeout
from resilience.errors import InProgress, PermanentError, TransientError
from workers.settings import Settings, get_settings
from workers.topology import load_topology

IDEMPOTENCY_HEADER = "Idempotency-Key"


class DownstreamError(TransientError):
    """The dependency answered with a retryable failure (5xx, 429) or not at all."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DownstreamRejected(PermanentError):
    """The dependency refused the request as made (4xx other than 408/429)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DownstreamClient:
    """A pooled HTTP client for one dependency. Never waits longer than its timeouts."""

    def __init__(self, name: str, base_url: str, settings: Settings) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._connect = settings.connect_timeout_s
        self._read = settings.read_timeout_s
        limits = httpx.Limits(keepalive_expiry=settings.downstream_keepalive_s)
        self._http = httpx.Client(base_url=self.base_url, timeout=self._timeouts(),
                                  limits=limits)

    def _timeouts(self) -> httpx.Timeout:
        # Inside a deadline scope every phase shrinks to what is left of the budget.
        read = client_timeout(self._read)
        return httpx.Timeout(read, connect=min(self._connect, read))

    def request(
        self, method: str, path: str, *, json: Any = None, idempotency_key: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else {}
        try:
            response = self._http.request(
                method, path, json=json, params=params, headers=headers, timeout=self._timeouts()
            )
        except httpx.TimeoutException as exc:
            raise DownstreamError(f"{self.name}: timed out calling {path}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise DownstreamError(f"{self.name}: cannot reach {self.base_url}: {exc!r}") from exc
        status = response.status_code
        if status == 409 and idempotency_key:
            raise InProgress(f"{self.name}: {path}: a request with the same idempotency key is "
                             "still in progress", retry_after=_retry_after(response),
                             dependency=self.name)
        if status >= 500 or status in (408, 429):
            raise DownstreamError(f"{self.name}: {path} answered {status}", status=status)
        if status >= 400:
            raise DownstreamRejected(f"{self.name}: {path} refused ({status}): "
                                     f"{response.text[:200]}", status=status)
        return response.json()

    def post(self, path: str, payload: Any, *, idempotency_key: str | None = None) -> dict:
        return self.request("POST", path, json=payload, idempotency_key=idempotency_key)

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", path, params=params)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.1, min(float(response.headers.get("retry-after", "1")), 60.0))
    except ValueError:  # an HTTP date: not worth parsing for a hint
        return 1.0


def client_for(name: str, app: Any = None) -> DownstreamClient:
    """The process-wide client for the dependency ``name``: its ``url`` in the policy file
    Tidegate was installed with on ``app`` (a task passes ``self.app``), else in
    ``TIDEGATE_POLICY_FILE``. One per process: a prefork child never shares its parent's
    pooled connections (two processes writing one socket)."""
    return _client_for(name, app, os.getpid())


@functools.cache
def _client_for(name: str, app: Any, pid: int) -> DownstreamClient:
    if app is not None:
        from workers.installation import installation

        installed = installation(app)
        return DownstreamClient(name, installed.topology.dependency(name).url, installed.settings)
    settings = get_settings()
    dependency = load_topology(settings.policy_file).dependency(name)
    return DownstreamClient(name, dependency.url, settings)
