"""Settings from the environment (prefix ``TIDEGATE_``), validated once at start-up.

A wrong value becomes a :class:`~resilience.errors.ConfigError` that names the variable, so an
operator sees ``TIDEGATE_BROKER_URL: ...`` instead of a traceback from deep inside kombu.
Every client Tidegate builds takes its connect/read timeouts from here: none is infinite.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from resilience.errors import ConfigError

DEFAULT_POLICY_FILE = Path(__file__).with_name("policy.toml")


def _check_sentinel(url: str) -> None:
    from resilience.redis_sentinel import parse_sentinel_url

    try:
        parse_sentinel_url(url)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class Settings(BaseSettings):
    """Process settings. Immutable: build a new one (``model_copy(update=...)``) to change."""

    model_config = SettingsConfigDict(env_prefix="TIDEGATE_", frozen=True, extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = "redis://127.0.0.1:6379/1"
    policy_file: Path = DEFAULT_POLICY_FILE

    sqs_endpoint_url: str | None = None
    sqs_region: str = "us-east-1"
    sqs_queue_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,40}$")  # broker queues
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    api_tokens: SecretStr = SecretStr("")
    api_max_body_bytes: int = Field(default=256 * 1024, gt=0)
    rabbitmq_management_url: str | None = "http://127.0.0.1:15672"

    connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    read_timeout_s: float = Field(default=5.0, gt=0, le=300)
    publish_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Dependencies' HTTP clients close a pooled connection idle this long, well below the
    # servers' own idle limit (uvicorn, Node, Apache 5 s, gunicorn 2 s): a request sent as the
    # server closes an idle connection fails unread ("Connection reset by peer"), and a
    # non-idempotent write that fails after sending is dead-lettered, never retried.
    downstream_keepalive_s: float = Field(default=1.0, gt=0, le=300)

    task_soft_time_limit_s: float = Field(default=60.0, gt=0)
    task_hard_time_limit_s: float = Field(default=90.0, gt=0)
    visibility_timeout_s: int = Field(default=3600, gt=0)
    # Redis brokers: pop + unacked record in one Lua script (workers.transport), so a worker
    # SIGKILLed mid-fetch loses nothing. false: kombu's stock Redis transport.
    redis_reliable_fetch: bool = True
    # Celery task events (task-sent/received/started/succeeded/failed, and Tidegate's
    # task-deferred) for Flower and `celery events`; their cost: docs/delivery.md.
    task_events: bool = True
    # Worker liveness (docs/delivery.md, "Worker loss"): each worker process beats every
    # heartbeat_s with a key that lives heartbeat_ttl_s; on Redis the workers sweep (one at a
    # time) every orphan_sweep_s for unacked messages of workers whose heartbeat is gone, so a
    # SIGKILLed worker's tasks are back within about heartbeat_ttl_s + orphan_sweep_s.
    worker_heartbeat_s: float = Field(default=5.0, gt=0, le=60)
    worker_heartbeat_ttl_s: float = Field(default=15.0, gt=0, le=600)
    orphan_sweep_s: float = Field(default=5.0, gt=0, le=300)
    # SQS brokers: the work queues' visibility timeout. Workers extend what they hold every
    # heartbeat, so this bounds how long a dead worker's tasks stay hidden, not a task's length.
    sqs_visibility_timeout_s: int = Field(default=20, ge=1, le=12 * 3600)
    # Sentinel brokers: a publish waits for this many replicas (WAIT) or is refused (docs/ha.md)
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)

    # Queue for later (docs/queue-for-later.md). Queues are "tidegate-deferred-<dependency>"
    # (+ "-dlq") unless named or given by URL: "email=https://sqs.../q,search=my-queue".
    deferral_queue_prefix: str = "tidegate-deferred-"
    deferral_queues: str = ""
    deferral_dlqs: str = ""
    deferral_max_receive_count: int = Field(default=10, ge=1, le=1000)
    deferral_retention_s: int = Field(default=14 * 24 * 3600, ge=60, le=14 * 24 * 3600)
    deferral_near_retention_s: int = Field(default=24 * 3600, ge=0)
    sqs_max_attempts: int = Field(default=3, ge=1, le=10)
    replay_visibility_timeout_s: int = Field(default=60, ge=1, le=12 * 3600)
    replay_max_queue_depth: int = Field(default=500, ge=1)

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        from workers.brokers import SCHEMES  # the registry: one adapter per broker

        scheme = urlsplit(value).scheme.split("+")[0]
        if scheme not in SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}; use one of {', '.join(sorted(SCHEMES))}"
            )
        if scheme == "sentinel":
            _check_sentinel(value)
        return value

    @field_validator("deferral_queues", "deferral_dlqs")
    @classmethod
    def _dependency_map(cls, value: str) -> str:
        parse_dependency_map(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"redis", "rediss", "unix", "redis-cluster",
                                          "rediss-cluster", "sentinel"}:
            raise ValueError("must be a redis://, rediss://, unix://, redis-cluster:// or "
                             "sentinel:// URL")
        if urlsplit(value).scheme == "sentinel":
            _check_sentinel(value)
        if urlsplit(value).scheme.endswith("-cluster"):
            from resilience.redis_cluster import parse_cluster_url

            try:
                parse_cluster_url(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("policy_file")
    @classmethod
    def _policy_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @property
    def transport(self) -> str:
        """The kombu transport family: ``redis``, ``amqp``, ``sqs`` or ``memory`` (the name of
        the broker's adapter, :func:`workers.brokers.broker_for`)."""
        from workers.brokers import broker_for

        return broker_for(self).name

    def tokens(self) -> frozenset[str]:
        """The API bearer tokens (comma-separated in ``TIDEGATE_API_TOKENS``)."""
        raw = self.api_tokens.get_secret_value()
        return frozenset(t.strip() for t in raw.split(",") if t.strip())

    def check(self) -> Settings:
        """Cross-field rules that a single field cannot express."""
        if self.task_soft_time_limit_s >= self.task_hard_time_limit_s:
            raise ConfigError(
                "TIDEGATE_TASK_SOFT_TIME_LIMIT_S must be below TIDEGATE_TASK_HARD_TIME_LIMIT_S"
            )
        if self.visibility_timeout_s <= self.task_hard_time_limit_s:
            raise ConfigError(
                "TIDEGATE_VISIBILITY_TIMEOUT_S must exceed TIDEGATE_TASK_HARD_TIME_LIMIT_S, "
                "or Redis/SQS redeliver tasks that are still running"
            )
        if self.worker_heartbeat_ttl_s < 2 * self.worker_heartbeat_s:
            raise ConfigError(
                "TIDEGATE_WORKER_HEARTBEAT_TTL_S must be at least twice "
                "TIDEGATE_WORKER_HEARTBEAT_S, or one late beat declares a live worker dead"
            )
        if self.sqs_visibility_timeout_s < 2 * self.worker_heartbeat_s:
            raise ConfigError(
                "TIDEGATE_SQS_VISIBILITY_TIMEOUT_S must be at least twice "
                "TIDEGATE_WORKER_HEARTBEAT_S (held messages are extended every heartbeat)"
            )
        return self


def parse_dependency_map(text: str) -> dict[str, str]:
    """``"email=https://sqs.../q,search=name"`` -> ``{"email": ..., "search": "name"}``."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"expected DEPENDENCY=QUEUE_NAME_OR_URL, got {item!r}")
        result[name.strip()] = value.strip()
    return result


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = "_".join(str(p) for p in item["loc"]).upper()
        parts.append(f"TIDEGATE_{field}: {item['msg']}")
    return "; ".join(parts)


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; raise ConfigError naming the bad variable."""
    try:
        return Settings(**overrides).check()  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc)}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
