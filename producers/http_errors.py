"""The HTTP API's refusals: one :class:`Problem` per answer that is not a success, and how
each Tidegate error maps to a status (docs/http-api.md's table).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from resilience.errors import (
    ConfigError,
    DeferralError,
    PermanentError,
    RateLimited,
    RejectedError,
    TidegateError,
    TransientError,
)
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownQueue, UnknownTask

from .http_schema import ApiSettings
from .idempotency import IdempotencyConflict, IdempotencyUnavailable


class Problem(Exception):
    """An HTTP answer other than 2xx, raised from inside the handlers."""

    def __init__(self, status: int, error: str, message: str, *, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.field, self.retry_after = field, retry_after

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.field:
            out["field"] = self.field
        if self.retry_after is not None:
            out["retry_after_s"] = round(self.retry_after, 3)
        return out

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="tidegate"'
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def _field_of(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "body"


def _validation_problem(exc: ValidationError) -> Problem:
    first = exc.errors()[0]
    where = _field_of(first)
    message = "; ".join(f"{_field_of(e)}: {e['msg']}" for e in exc.errors()[:5])
    return Problem(422, "invalid_request", message, field=where.split(".")[0])


def _problem_for(exc: TidegateError, settings: ApiSettings) -> Problem:
    """What each of the producer's errors means over HTTP."""
    if isinstance(exc, UnknownTask):
        return Problem(422, "unknown_task", str(exc), field="task")
    if isinstance(exc, UnknownQueue):
        return Problem(422, "unknown_queue", str(exc), field="queue")
    if isinstance(exc, InvalidPayload):
        text = str(exc)
        field = next((f for f in ("idempotency_key", "kwargs", "deadline") if f in text), "args")
        return Problem(422, "invalid_payload", text,
                       field="deadline_ms" if field == "deadline" else field)
    if isinstance(exc, RateLimited):
        return Problem(429, "rate_limited", str(exc), retry_after=exc.retry_after or 1.0)
    if isinstance(exc, RejectedError):  # Backpressure, Shed
        return Problem(503, exc.reason, str(exc), retry_after=exc.retry_after or 1.0)
    if isinstance(exc, IdempotencyConflict):
        return Problem(409, "idempotency_conflict", str(exc), field="idempotency_key",
                       retry_after=1.0)
    if isinstance(exc, BrokerUnavailable | IdempotencyUnavailable | DeferralError):
        return Problem(503, "unavailable", str(exc),
                       retry_after=float(settings.broker_retry_after_s))
    if isinstance(exc, ConfigError | PermanentError):
        return Problem(422, "invalid_request", str(exc))
    if isinstance(exc, TransientError):
        return Problem(503, "unavailable", str(exc),
                       retry_after=float(settings.broker_retry_after_s))
    return Problem(500, "internal_error", "internal error")




CLIENT_CLOSED = 499  # the client hung up before the answer (nginx's code; never sent)


class ClientGone(Problem):
    """The client hung up mid-body: nothing to answer, nothing to log, not a server error."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "client_closed_request",
                         "the client closed the connection before sending the whole body")
