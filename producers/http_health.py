"""The API's own bookkeeping: response counting by route and status, queue depths for
``/v1/queues`` and the readiness checks of ``/readyz``.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from starlette.requests import ClientDisconnect

from workers.depth import DepthUnavailable

from . import metrics
from .http_errors import CLIENT_CLOSED
from .producer import Producer


class _CountResponses:
    """``tidegate_api_requests_total`` by route and status: plain ASGI, because Starlette's
    BaseHTTPMiddleware costs a task and two streams per request, a lot beside a refusal. A
    client that hung up (ClientDisconnect) counts as 499, never as a server error."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._children: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sent(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except ClientDisconnect:  # hung up where _read_body could not see it: not our error
            status = CLIENT_CLOSED
        finally:
            key = (_route(scope), status)
            child = self._children.get(key)
            if child is None:  # labels() is a lock and a dict of tuples: once per pair
                child = self._children[key] = metrics.HTTP_REQUESTS.labels(
                    route=key[0], status=str(status))
            child.inc()


def _route(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _depths(producer: Producer) -> list[dict[str, Any]]:
    out = []
    throttle = producer.throttle
    for queue in producer.topology.work_queues:
        entry: dict[str, Any] = {"queue": queue}
        try:
            if throttle is not None:
                est = throttle.cache.estimate(queue)
                d = est.reading
                entry["published_since_reading"] = est.published_since
                entry["drain_rate_per_s"] = est.drain_rate
                cfg = throttle.config(queue)
                entry["low_watermark"], entry["high_watermark"] = (cfg.low_watermark,
                                                                   cfg.high_watermark)
            else:
                from workers.depth import probe_for

                d = probe_for(producer.settings, producer.topology).depth(queue)
            entry.update(ready=d.ready, in_flight=d.in_flight, delayed=d.delayed,
                         backlog=d.backlog, oldest_age_s=d.oldest_age_s, consumers=d.consumers,
                         source=d.source, age_s=round(max(0.0, time.time() - d.measured_at), 3))
        except DepthUnavailable as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def _readiness(producer: Producer, state: Any) -> dict[str, str]:

    checks = {}
    try:
        state.ping()
        checks["state_redis"] = "ok"
    except (redis.RedisError, OSError) as exc:
        checks["state_redis"] = f"unavailable: {exc}"
    try:
        with producer.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=producer.settings.connect_timeout_s)
        checks["broker"] = "ok"
    except Exception as exc:  # any failure to connect means not ready, whatever its type
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    return checks
