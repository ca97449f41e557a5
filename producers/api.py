"""The HTTP service: ``tidegate api`` (FastAPI on uvicorn). See docs/http-api.md.

``POST /v1/jobs`` goes through the same :class:`~producers.producer.Producer` as Python
callers, so the answer says exactly what the producer decided: 202 queued or deferred, 422
naming the bad field, 429 (client over its rate) or 503 (shed under backpressure, broker
unreachable) with a ``Retry-After`` computed from the queue's drain rate. ``/healthz`` and
``/readyz`` are never shed and need no token.

This module holds the routes and the admission of a request (on the event loop) on its way to
a publish thread; what they are built from lives beside it: the models and settings
(:mod:`producers.http_schema`), the refusals (:mod:`producers.http_errors`), reading a request
(:mod:`producers.http_input`) and the API's own bookkeeping (:mod:`producers.http_health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import ValidationError

from resilience.errors import (
    Shed,
    TidegateError,
)
from resilience.ratelimit import RateLimitConfig
from resilience.shedding import Priority
from workers.idempotency import ttl_from_env
from workers.jobs import JobStatuses

from .admission import CachedState, LoopLag, PublishLane
from .http_errors import Problem, _problem_for, _validation_problem
from .http_fast import JobsFastPath, TidegateAPI
from .http_health import _CountResponses, _depths, _readiness
from .http_input import Tokens, _nesting_exceeds, _parse_json, _read_body
from .http_schema import BATCH_MAX, MAX_NESTING, ApiSettings, JobAccepted, JobRequest, JobStatus
from .idempotency import IdempotencyConflict, SubmissionStore
from .producer import EnqueueResult, Producer, client_limiter, state_client

__all__ = ["MAX_NESTING", "ApiSettings", "JobRequest", "Problem", "_nesting_exceeds",
           "create_api"]

log = logging.getLogger(__name__)

LATER = "(drawn on the publish lane)"  # task_id placeholder until the job is admitted
Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, body, headers


@dataclasses.dataclass(frozen=True)
class _Ticket:
    """A job admitted on the event loop, on its way to a publish thread."""

    p: Any  # producers.model.Prepared
    budget: float
    depth_decided: bool
    may_defer: bool
    fingerprint: dict[str, Any] | None

    def with_id(self) -> _Ticket:
        if self.p.task_id is not LATER:
            return self
        return dataclasses.replace(self, p=dataclasses.replace(
            self.p, task_id=str(uuid.uuid4()), fresh_id=True))


def create_api(
    producer: Producer | None = None,
    *,
    api_settings: ApiSettings | None = None,
    state: Any = None,
) -> TidegateAPI:
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
    lag = LoopLag(publishing=lane.busy)
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

    app = TidegateAPI(
        lifespan=lifespan,
        title="Tidegate",
        version="1",
        description="Enqueue jobs with priority, idempotency and backpressure. "
                    "See docs/http-api.md.",
    )

    async def handle_job(authorization: str | None, raw: bytes) -> Answer:
        """``POST /v1/jobs`` from its Authorization header and body (producers/http_fast.py
        serves it without the framework; the FastAPI route below documents it)."""
        client = tokens.client(authorization)
        return await submit(client, _parse_json(raw))

    app.add_middleware(_CountResponses)
    app.fast_path = _CountResponses(JobsFastPath(handle_job, limit))

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

    def gate(t: _Ticket, client: str, pending: int = 0, limited: Any = False
             ) -> EnqueueResult | None:
        """Cluster-wide rate limit (unless already decided: ``limited``, the refusal or
        None), deferral, depth (if the loop had no fresh reading): the deferred result, or
        None when the job is to be published."""
        p = t.p
        if limited is False:
            producer._rate_limit(p, client)
        elif limited is not None:
            raise limited
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
        # keyless jobs (never a replay) ask the cluster-wide limiter together: one round trip
        keyless = [k for k, (t, _) in enumerate(items) if t.fingerprint is None]
        limited = dict(zip(keyless, producer._rate_limit_many(
            [(items[k][0].p, items[k][1]) for k in keyless]), strict=True))
        for k, (t, client) in enumerate(items):
            t = t.with_id()
            reservation = None
            try:
                reservation, replayed = reserve(t.p, client, t.fingerprint)
                if replayed is not None:
                    out[k] = replayed
                    continue
                result = gate(t, client, pending.get(t.p.queue, 0), limited.get(k, False))
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
        # a late loop or a busy CPU sheds only while publishing competes for the GIL
        shed = (lag.refusal(p.priority, lane.busy())
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
        # TidegateAPI serves this route with JobsFastPath; this handler documents it (OpenAPI)
        # and serves it where the app is mounted inside another one
        status, payload, headers = await handle_job(request.headers.get("authorization"),
                                                    await _read_body(request, limit))
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
