"""The HTTP service: ``tidegate api`` (FastAPI on uvicorn). See docs/http-api.md.

``POST /v1/jobs`` goes through the same :class:`~producers.producer.Producer` as Python
callers, so the answer says exactly what the producer decided: 202 queued or deferred, 422
naming the bad field, 429 (client over its rate) or 503 (shed under backpressure, broker
unreachable) with a ``Retry-After`` computed from the queue's drain rate. ``/healthz`` and
``/readyz`` are never shed and need no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import redis
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import ClientDisconnect

from resilience.errors import (
    ConfigError,
    DeferralError,
    PermanentError,
    RateLimited,
    RejectedError,
    Shed,
    TidegateError,
    TransientError,
)
from resilience.ratelimit import RateLimitConfig
from resilience.shedding import Priority
from workers.depth import DepthUnavailable
from workers.errors import BrokerUnavailable, InvalidPayload, UnknownQueue, UnknownTask
from workers.idempotency import ttl_from_env
from workers.jobs import JobStatuses

from . import metrics
from .admission import CachedState, LoopLag, PublishLane
from .idempotency import IdempotencyConflict, IdempotencyUnavailable, SubmissionStore
from .producer import EnqueueResult, Producer, client_limiter, state_client

__all__ = ["ApiSettings", "JobRequest", "create_api"]

log = logging.getLogger(__name__)

BATCH_MAX = 500
MAX_NESTING = 64  # JSON depth of a body; far below where Python recursion gives out


class ApiSettings(BaseSettings):
    """The HTTP service's own knobs (``TIDEGATE_API_*``); tokens and body limit live in
    :class:`workers.settings.Settings`."""

    model_config = SettingsConfigDict(env_prefix="TIDEGATE_API_", frozen=True, extra="ignore")

    client_rate_per_s: float = Field(default=50.0, gt=0)  # per bearer token, cluster-wide
    client_burst: int = Field(default=100, ge=1)
    max_wait_ms: int = Field(default=250, ge=0, le=30_000)  # throttle wait inside a request
    idempotency_ttl_s: int = Field(default=86_400, ge=60)
    broker_retry_after_s: int = Field(default=5, ge=1)
    publish_threads: int = Field(default=2, ge=1, le=256)  # the publish lane's concurrency
    publish_batch: int = Field(default=32, ge=1, le=500)  # keyless POSTs published together
    max_queued: int = Field(default=512, ge=1)  # jobs waiting for a publish thread, at most
    gil_switch_ms: float = Field(default=1.0, ge=0, le=100)  # served process; 0: Python's 5 ms


PriorityName = Literal["critical", "high", "medium", "low"]  # resilience.Priority, spelled


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    task: Annotated[str, Field(min_length=1, max_length=200, examples=["payments.charge"])]
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Strict: JSON true or 1.0 is not a priority (lax ints would read true as 1, "high").
    priority: PriorityName | Annotated[StrictInt, Field(ge=0, le=3)] = "high"
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    queue: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    deadline_ms: Annotated[int, Field(gt=0, le=86_400_000)] | None = None


class JobAccepted(BaseModel):
    id: str
    state: Literal["queued", "deferred"]
    queue: str
    task: str
    priority: str
    idempotency_key: str | None = None


class JobStatus(BaseModel):
    """The body of ``GET /v1/jobs/{id}``: the job's latest state (``workers.jobs``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: Literal["queued", "running", "retrying", "succeeded", "failed", "dead_lettered",
                   "deferred", "replayed"]
    at: float = Field(description="epoch seconds of this state")
    task: str | None = None
    queue: str | None = None
    priority: str | None = None
    worker: str | None = None
    attempt: int | None = None
    retry_in_s: float | None = Field(None, description="retrying: the countdown")
    reason: str | None = Field(None, description="dead_lettered: the DLQ reason")
    record: str | None = Field(None, description="dead_lettered/replayed: the DLQ record id")
    dlq: str | None = None
    error: str | None = None
    deferred_id: str | None = Field(None, description="deferred: the SQS entry")
    dependency: str | None = None
    replay_id: str | None = Field(None, description="replayed: the replay's own job id")
    replay: dict[str, Any] | None = Field(None, description="replayed: the replay's status")
    replayed_from: str | None = None
    job: str | None = Field(None, description="a worker's deferral: the deferred job's id")
    outcome: Literal["not_attempted", "unknown"] | None = Field(
        None, description="dead_lettered/failed, graceful fallback: whether a write reached "
        "the dependency")
    message: str | None = Field(None, description="dead_lettered/failed, graceful fallback: "
                                "what to tell the user (states only what is known)")


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


LATER = "(drawn on the publish lane)"  # task_id placeholder until the job is admitted
Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, body, headers


@dataclasses.dataclass(frozen=True)
class _Ticket:
    """A job admitted on the event loop, on its way to a publish thread."""

    p: Any  # producers.producer._Prepared
    budget: float
    depth_decided: bool
    may_defer: bool
    fingerprint: dict[str, Any] | None

    def with_id(self) -> _Ticket:
        if self.p.task_id is not LATER:
            return self
        return dataclasses.replace(self, p=dataclasses.replace(
            self.p, task_id=str(uuid.uuid4()), fresh_id=True))
CLIENT_CLOSED = 499  # the client hung up before the answer (nginx's code; never sent)


class ClientGone(Problem):
    """The client hung up mid-body: nothing to answer, nothing to log, not a server error."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "client_closed_request",
                         "the client closed the connection before sending the whole body")


class Tokens:
    """Bearer tokens, looked up by their SHA-256 (so the time taken says nothing about how much
    of a token matched); a client is named by its token's hash."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        # digest -> client name: one hash and one dict lookup per request instead of a
        # constant-time comparison with every token (41 of them cost the event loop 4%)
        self._by_digest = {hashlib.sha256(t).digest(): "token-" + hashlib.sha256(t).hexdigest()[:16]
                           for t in self._tokens}

    def client(self, header: str | None) -> str:
        if not self._tokens:
            raise Problem(401, "unauthorized",
                          "no API tokens are configured (set TIDEGATE_API_TOKENS)")
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Problem(401, "unauthorized", "missing bearer token (Authorization: Bearer ...)")
        client = self._by_digest.get(hashlib.sha256(value.strip().encode()).digest())
        if client is None:
            raise Problem(401, "unauthorized", "invalid bearer token")
        return client


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise Problem(400, "bad_request", "invalid Content-Length") from None
        if too_big:
            raise Problem(413, "payload_too_large",
                          f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked or lying about its length
                raise Problem(413, "payload_too_large",
                              f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise Problem(422, "invalid_json", f"body is not valid JSON: {exc}", field="body"
                      ) from None
    if _nesting_exceeds(value, MAX_NESTING):  # else validation/serialisation recurse: a 500
        raise Problem(422, "invalid_json", f"body nests deeper than {MAX_NESTING} levels",
                      field="body")
    return value


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests arrays/objects deeper than ``limit`` (iterative: no
    recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def create_api(
    producer: Producer | None = None,
    *,
    api_settings: ApiSettings | None = None,
    state: Any = None,
) -> FastAPI:
    """The FastAPI app over ``producer`` (built from the environment if not given)."""
    producer = producer or Producer()
    settings = producer.settings
    api_settings = api_settings or ApiSettings()
    state = state or state_client(settings)
    if producer.limiter is None:
        producer.limiter = client_limiter(settings, RateLimitConfig(
            api_settings.client_rate_per_s, api_settings.client_burst), state, name="api-client")
    lane = PublishLane(api_settings.publish_threads, api_settings.max_queued,
                       batch=lambda items: publish_items(items),
                       max_batch=api_settings.publish_batch)
    lag = LoopLag()
    cached = CachedState(producer, RateLimitConfig(api_settings.client_rate_per_s,
                                                   api_settings.client_burst))
    tokens = Tokens(settings.tokens())
    submissions = SubmissionStore(state, ttl_s=api_settings.idempotency_ttl_s)
    limit = settings.api_max_body_bytes
    max_wait_s = api_settings.max_wait_ms / 1000
    if not settings.tokens():
        log.warning("TIDEGATE_API_TOKENS is empty: every /v1 request will be refused (401)")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if api_settings.gil_switch_ms:
            # The event loop answers; publish threads hold the GIL for up to a switch interval
            # each time the loop gives it up for a syscall (5 ms by default: a convoy).
            sys.setswitchinterval(api_settings.gil_switch_ms / 1000)
        yield
        cached.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Tidegate",
        version="1",
        description="Enqueue jobs with priority, idempotency and backpressure. "
                    "See docs/http-api.md.",
    )

    app.add_middleware(_CountResponses)

    @app.exception_handler(Problem)
    async def problem(_: Request, exc: Problem) -> JSONResponse:
        return exc.response()

    def reserve(p: Any, client: str, reservation: Any) -> tuple[Any, Answer | None]:
        """The idempotency record of one job on a lane thread: (reservation, replayed answer)."""
        if reservation is None:
            return None, None
        # no waiting on a lane thread: submit() retries from the event loop
        reservation = submissions.reserve(client, p.idempotency_key, reservation, wait_s=0)
        if not reservation.fingerprint_matches:
            raise Problem(422, "idempotency_key_reused",
                          "this idempotency_key was used for a different job",
                          field="idempotency_key")
        if reservation.job is not None:
            return reservation, (202, reservation.job, {"Idempotent-Replayed": "true"})
        return reservation, None

    def settle(result: EnqueueResult, reservation: Any) -> Answer:
        accepted = result.to_dict()
        if reservation is not None:
            submissions.complete(reservation, accepted)
        return 202, accepted, {}

    def gate(t: _Ticket, client: str, pending: int = 0) -> EnqueueResult | None:
        """Cluster-wide rate limit, deferral, depth (if the loop had no fresh reading): the
        deferred result, or None when the job is to be published."""
        p = t.p
        producer._rate_limit(p, client)
        result = producer._defer(p) if t.may_defer else None
        if result is None and not t.depth_decided and producer.throttle is not None:
            d = producer.throttle.decide(p.queue, p.priority, pending)
            if not d.admitted:
                raise producer.throttle.refusal(d, 0.0)
        return result

    def publish(t: _Ticket, client: str) -> Answer:
        """The blocking half of one job, on a lane thread: idempotency record, gates, publish."""
        t = t.with_id()
        reservation, replayed = reserve(t.p, client, t.fingerprint)
        if replayed is not None:
            return replayed
        try:
            result = gate(t, client)
            if result is None:
                with cached.gate.publish():
                    producer._publish(t.p)
                p = t.p
                result = producer._done(EnqueueResult(p.task_id, "queued", p.queue, p.task,
                                                      p.priority, p.idempotency_key))
        except BaseException:
            if reservation is not None:
                submissions.release(reservation)
            raise
        return settle(result, reservation)

    def publish_many(tickets: list[_Ticket], client: str,
                     since: float) -> list[Answer | BaseException]:
        """The blocking half of a batch on one lane thread: each job's record and gates, then
        one batch publish (producers/batch.py) of those left to publish. A job whose own
        budget (a short ``deadline_ms``) ran out while the batch waited for this thread is
        shed alone, as it would have been on its own; the rest of the batch goes on."""
        waited = time.monotonic() - since
        late = {k for k, t in enumerate(tickets)
                if waited > t.budget and t.p.priority is not Priority.CRITICAL}
        kept = [t for k, t in enumerate(tickets) if k not in late]
        published = iter(publish_items([(t, client) for t in kept]))
        return [Shed(f"api overloaded (no publish thread within {t.budget * 1000:.0f} ms): "
                     f"priority {t.p.priority.name} shed", priority=t.p.priority,
                     retry_after=1.0) if k in late else next(published)
                for k, t in enumerate(tickets)]

    def publish_items(items: list[tuple[_Ticket, str]]) -> list[Answer | BaseException]:
        """:func:`publish_many` for jobs of several requests (and clients): the lane runs the
        single POSTs waiting for a thread together, one broker round trip for all of them."""
        out: list[Answer | BaseException | None] = [None] * len(items)
        todo: list[tuple[int, _Ticket, Any]] = []
        pending: dict[str, int] = {}
        for k, (t, client) in enumerate(items):
            t = t.with_id()
            reservation = None
            try:
                reservation, replayed = reserve(t.p, client, t.fingerprint)
                if replayed is not None:
                    out[k] = replayed
                    continue
                result = gate(t, client, pending.get(t.p.queue, 0))
            except BaseException as exc:  # this job's answer; the others go on
                if reservation is not None:
                    submissions.release(reservation)
                out[k] = exc
                continue
            if result is not None:
                out[k] = settle(result, reservation)
                continue
            todo.append((k, t, reservation))
            pending[t.p.queue] = pending.get(t.p.queue, 0) + 1
        with cached.gate.publish():
            published = producer._publish_many([t.p for _, t, _ in todo])
        for (k, _, reservation), result in zip(todo, published, strict=True):
            if isinstance(result, EnqueueResult):
                out[k] = settle(result, reservation)
            else:
                if reservation is not None:
                    submissions.release(reservation)
                out[k] = result
        return out  # type: ignore[return-value]

    def answer(exc: BaseException) -> Answer:
        if isinstance(exc, Problem):
            return exc.status, exc.body(), exc.headers()
        if isinstance(exc, TidegateError):
            p = _problem_for(exc, api_settings)
            return p.status, p.body(), p.headers()
        raise exc

    def admit(client: str, body: Any, pending: dict[str, int] | None = None) -> _Ticket:
        """Everything that may refuse one job, decided on the event loop from cached state
        (raises Problem or a TidegateError); ``pending``: jobs of the same batch admitted to
        its queue before it."""
        if not isinstance(body, dict):
            raise Problem(422, "invalid_request", "a job must be a JSON object", field="body")
        try:
            job = JobRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_problem(exc) from None
        # The same key always names the same task id, even after the record expires. A
        # fresh id is drawn on the lane: uuid4 reads os.urandom, which releases the GIL, and
        # winning it back from a busy publish thread can cost the loop a switch interval.
        task_id = LATER
        if job.idempotency_key is not None:
            task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{client}/{job.idempotency_key}"))
        p = producer._prepare(job.task, job.args, job.kwargs, job.priority,
                              job.idempotency_key, job.queue,
                              job.deadline_ms / 1000 if job.deadline_ms else None, task_id)
        budget = max_wait_s if p.deadline_s is None else min(max_wait_s, p.deadline_s / 2)
        cached.rate_limit(client, p.queue, p.priority)
        may_defer = cached.breaker_open(p.task)
        decision = None if may_defer else cached.depth_decision(
            p.queue, p.priority, (pending or {}).get(p.queue, 0))
        if decision is not None and not decision.admitted:
            raise producer.throttle.refusal(decision, 0.0)
        producer._check_gate(p)  # broker known down: 503 at once (no I/O)
        # a late loop is shed only while publishing competes with it for the GIL
        shed = ((lag.refusal(p.priority) if lane.busy() else None)
                or lane.refusal(p.priority, budget))
        if shed is not None:
            producer._refused(p, "shed")
            raise shed
        fingerprint = job.model_dump() if job.idempotency_key is not None else None
        if pending is not None:
            pending[p.queue] = pending.get(p.queue, 0) + 1
        return _Ticket(p, budget, decision is not None, may_defer, fingerprint)

    async def submit(client: str, body: Any) -> Answer:
        """One job: (status, body, headers).

        Everything that may refuse is decided on the event loop from cached state; only
        an admitted job waits for a publish thread (see producers/admission.py)."""
        try:
            t = admit(client, body)
            pending_until = time.monotonic() + submissions.pending_wait_s
            while True:
                try:
                    # keyless jobs may share a broker round trip with others waiting; a
                    # keyed one runs alone (a repeat of its key must see its record settled)
                    return await lane.run(t.p.priority, t.budget,
                                          functools.partial(publish, t, client),
                                          (t, client) if t.fingerprint is None else None)
                except IdempotencyConflict:  # the same key is being enqueued by another request
                    if time.monotonic() >= pending_until:
                        raise
                    await asyncio.sleep(0.05)
        except (Problem, TidegateError) as exc:
            return answer(exc)

    async def submit_many(client: str, bodies: list[Any]) -> list[Answer]:
        """A batch: each job admitted on the loop as a single one is, then the admitted ones
        published together on one lane thread (the most important job's place in the lane,
        the longest budget: a job with a shorter one is shed alone if the batch waited past
        it). A job whose idempotency key another request is enqueueing right now is retried
        alone."""
        answers: list[Answer | None] = [None] * len(bodies)
        tickets: list[tuple[int, _Ticket]] = []
        pending: dict[str, int] = {}
        for k, body in enumerate(bodies):
            try:
                tickets.append((k, admit(client, body, pending)))
            except (Problem, TidegateError) as exc:
                answers[k] = answer(exc)
        if tickets:
            top = min((t for _, t in tickets), key=lambda t: int(t.p.priority))
            budget = max(t.budget for _, t in tickets)
            try:
                outcomes = await lane.run(top.p.priority, budget, functools.partial(
                    publish_many, [t for _, t in tickets], client, time.monotonic()))
            except (Problem, TidegateError) as exc:  # shed while waiting for a lane thread
                outcomes = [exc] * len(tickets)
            for (k, _), outcome in zip(tickets, outcomes, strict=True):
                if isinstance(outcome, IdempotencyConflict):
                    answers[k] = await submit(client, bodies[k])
                elif isinstance(outcome, Problem | TidegateError):
                    answers[k] = answer(outcome)
                elif isinstance(outcome, BaseException):  # a bug: this job's 500, not all
                    log.error("batch job failed", exc_info=outcome)
                    answers[k] = answer(Problem(500, "internal_error", "internal error"))
                else:
                    answers[k] = outcome
        return answers  # type: ignore[return-value]

    @app.post(
        "/v1/jobs", status_code=202, response_model=JobAccepted,
        responses={401: {}, 409: {}, 413: {}, 422: {}, 429: {}, 503: {}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": JobRequest.model_json_schema()}}}},
    )
    async def post_job(request: Request) -> JSONResponse:
        """Enqueue one job; 202 with its id, state (queued or deferred) and queue."""
        client = tokens.client(request.headers.get("authorization"))
        body = _parse_json(await _read_body(request, limit))
        status, payload, headers = await submit(client, body)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.post(
        "/v1/jobs/batch", status_code=200,
        responses={401: {}, 413: {}, 422: {}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["jobs"], "properties": {"jobs": {
                "type": "array", "maxItems": BATCH_MAX,
                "items": JobRequest.model_json_schema()}}}}}}},
    )
    async def post_batch(request: Request) -> JSONResponse:
        """Enqueue up to 500 jobs; one result per job, in order, each with its own status."""
        client = tokens.client(request.headers.get("authorization"))
        body = _parse_json(await _read_body(request, limit))
        jobs = body.get("jobs") if isinstance(body, dict) else None
        if not isinstance(jobs, list) or not jobs:
            raise Problem(422, "invalid_request", "jobs must be a non-empty array", field="jobs")
        if len(jobs) > BATCH_MAX:
            raise Problem(422, "invalid_request", f"at most {BATCH_MAX} jobs per batch",
                          field="jobs")
        results = []
        for status, payload, headers in await submit_many(client, jobs):
            results.append({"status": status, **payload,
                            **({"retry_after_s": payload.get("retry_after_s")}
                               if "Retry-After" in headers else {})})
        return JSONResponse({"results": results})

    jobs = producer.jobs or JobStatuses(state, ttl_from_env())

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus,
             responses={401: {}, 404: {}, 503: {}})
    async def get_job(request: Request,
                      job_id: Annotated[str, Path(min_length=1, max_length=255)]) -> JSONResponse:
        """A job's latest state: queued, running, retrying, succeeded, failed, dead_lettered
        (with its reason), deferred or replayed; kept for the idempotency TTL."""
        tokens.client(request.headers.get("authorization"))
        try:
            doc = await asyncio.to_thread(jobs.read, job_id)
        except (redis.RedisError, OSError) as exc:
            raise Problem(503, "unavailable", f"job status store unreachable: {exc}",
                          retry_after=float(api_settings.broker_retry_after_s)) from None
        if doc is None:
            raise Problem(404, "not_found", f"no job {job_id!r} (never seen, or older "
                          f"than {jobs.ttl_ms // 1000} s)")
        return JSONResponse(doc)

    @app.get("/v1/queues", responses={401: {}})
    async def queues(request: Request) -> dict[str, Any]:
        """Depth of every work queue (shared cache: at most a fraction of a second old)."""
        tokens.client(request.headers.get("authorization"))
        return {"queues": await asyncio.to_thread(_depths, producer)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up (never shed, no token)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {}})
    async def readyz() -> JSONResponse:
        """Ready when the broker and the shared-state Redis answer (never shed, no token)."""
        checks = await asyncio.to_thread(_readiness, producer, state)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text/plain
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


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
    import redis

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
