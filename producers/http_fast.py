"""``POST /v1/jobs`` without the framework: the one route an overloaded service must answer
in microseconds, served as plain ASGI.

Why not the FastAPI route: for a refusal decided from cached state, FastAPI's per-request
machinery (router, dependency solving, request object, exception handlers, response class)
costs as much CPU as the decision itself; under a load of three times what the API can
publish, that is the difference between answering every refusal in milliseconds and a
kernel backlog of seconds. The route stays declared in FastAPI for the OpenAPI schema and
``/docs``; this app answers it first, through the same handler, with the same status
codes, bodies and headers (``tests/integration/test_api*.py`` run through it).

:class:`TidegateAPI` (the app ``create_api`` returns) hands the route to it before FastAPI's
own ``__call__`` (telemetry, error and body-limit middleware, router), inside the response
counter (``tidegate_api_requests_total`` labels it ``/v1/jobs``). A client that hangs up
mid-body raises Starlette's ``ClientDisconnect``, which the counter files as 499, as for every
other route; an unexpected error reaches uvicorn, which logs it and answers 500.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from .http_errors import ClientGone, Problem
from .http_input import read_bounded

__all__ = ["JobsFastPath", "TidegateAPI"]

PATH = "/v1/jobs"
Handle = Callable[[str | None, bytes], Awaitable[tuple[int, dict[str, Any], dict[str, str]]]]


class _Route:
    """What the response counter reads from ``scope["route"]``."""

    path = PATH


_ROUTE = _Route()
_JSON = (b"content-type", b"application/json")
# Starlette's JSONResponse encoding; one encoder (json.dumps builds one per call with options)
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class JobsFastPath:
    """ASGI app for ``POST /v1/jobs`` (:meth:`serves` says which requests): the body goes to
    ``handle(authorization, body)``, which returns (status, JSON body, headers) or raises
    :class:`Problem`; ``limit``: the body size refused with 413 (declared or streamed)."""

    def __init__(self, handle: Handle, limit: int) -> None:
        self.handle, self.limit = handle, limit

    @staticmethod
    def serves(scope: dict[str, Any]) -> bool:
        return (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] == scope.get("root_path", "") + PATH)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["route"] = _ROUTE
        authorization = declared = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        try:
            body = await read_bounded(declared, _chunks(receive), self.limit)
            status, payload, headers = await self.handle(authorization, body)
        except ClientGone:  # nothing to answer; the counter files it as 499
            raise ClientDisconnect() from None
        except Problem as exc:
            status, payload, headers = exc.status, exc.body(), exc.headers()
        raw = _encode(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            _JSON, (b"content-length", str(len(raw)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": raw})


async def _chunks(receive: Any) -> AsyncIterator[bytes]:
    """A request's body chunks from ASGI ``receive`` (as Starlette's ``Request.stream``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class TidegateAPI(FastAPI):
    """FastAPI, with ``POST /v1/jobs`` answered by ``fast_path`` (a :class:`JobsFastPath`
    inside the response counter) before FastAPI's per-request machinery."""

    fast_path: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.fast_path is not None and JobsFastPath.serves(scope):
            await self.fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
