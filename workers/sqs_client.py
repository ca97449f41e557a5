"""A boto3 SQS client that cannot hang, and how to reach SQS.

Used by the queue-for-later store (``workers.sqs_deferral``) and by the SQS broker adapter
(``workers.brokers.sqs``) for its depth probe and dead-letter reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resilience.errors import ConfigError

__all__ = ["SqsClientConfig", "sqs_client"]


@dataclass(frozen=True)
class SqsClientConfig:
    """How to reach SQS. Credentials left ``None`` fall back to boto3's default chain."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    max_attempts: int = 3  # botocore "standard" retry mode, first attempt included

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 300):
                raise ConfigError(f"SQS {name} must be in (0, 300] seconds, got {value!r}")
        if not (isinstance(self.max_attempts, int) and 1 <= self.max_attempts <= 10):
            raise ConfigError(f"SQS max_attempts must be 1-10, got {self.max_attempts!r}")


def sqs_client(cfg: SqsClientConfig) -> Any:
    """A boto3 SQS client that cannot hang: finite timeouts, bounded retries."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        max_pool_connections=20,
    )
    return boto3.session.Session().client(
        "sqs",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=config,
    )
