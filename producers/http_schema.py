"""What the HTTP API takes and answers: its settings and the request and response models
(the OpenAPI schema is built from these).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from pydantic_settings import BaseSettings, SettingsConfigDict

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
