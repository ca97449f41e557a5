"""SQS (``sqs://``): kombu's SQS transport on boto3.

What differs here: no message priorities, no redelivery flag (a repeat looks like a first
delivery), a short visibility timeout that workers extend for what they hold
(:mod:`workers.visibility`), kombu's queue names (dots become dashes, a prefix per
environment), approximate depth counters, and a DLQ read with SQS's own calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from workers.brokers.base import BrokerAdapter
from workers.depth import DepthUnavailable, QueueDepth
from workers.sqs_deferral import SqsClientConfig, sqs_client

if TYPE_CHECKING:
    from workers.settings import Settings

__all__ = ["SQSBroker", "SQSDepthProbe", "broker_sqs_config", "sqs_queue_name"]


class SQSBroker(BrokerAdapter):
    name = "sqs"
    schemes = ("sqs",)

    def transport_options(self, settings: Settings) -> dict[str, Any]:
        connect, read = settings.connect_timeout_s, settings.read_timeout_s
        return {
            "region": settings.sqs_region,
            "queue_name_prefix": settings.sqs_queue_prefix,  # one namespace per environment
            # short: workers extend what they hold (workers.visibility), a dead one's return
            "visibility_timeout": settings.sqs_visibility_timeout_s,
            "wait_time_seconds": 1,
            "polling_interval": 0.2,
            "is_secure": (settings.sqs_endpoint_url or "https").startswith("https"),
            "client-config": {
                "connect_timeout": connect,
                "read_timeout": read + 1,  # above wait_time_seconds (long polling)
                "retries": {"max_attempts": 3, "mode": "standard"},
            },
        }

    def client(self, settings: Settings) -> Any:
        """A boto3 client of the broker's SQS (bounded timeouts, two attempts)."""
        return sqs_client(broker_sqs_config(settings))

    def depth_probe(self, settings: Settings) -> SQSDepthProbe:
        return SQSDepthProbe(self.client(settings), prefix=settings.sqs_queue_prefix)


def sqs_queue_name(queue: str, prefix: str = "") -> str:
    """The SQS queue name kombu uses for a Celery queue (dots become dashes, bar ``.fifo``)."""
    if queue.endswith(".fifo"):
        return prefix + queue[:-5].replace(".", "-") + ".fifo"
    return prefix + queue.replace(".", "-")


class SQSDepthProbe:
    """SQS's approximate counters (eventually consistent, by AWS's own description).

    ``oldest_age_s`` is None: SQS publishes ApproximateAgeOfOldestMessage only as a CloudWatch
    metric, not as a queue attribute (and moto has no CloudWatch feed for it).
    """

    source = "sqs"
    ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                  "ApproximateNumberOfMessagesDelayed")

    def __init__(self, client: Any, *, prefix: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._urls: dict[str, str] = {}

    def _url(self, queue: str) -> str:
        if queue not in self._urls:
            name = sqs_queue_name(queue, self.prefix)
            self._urls[queue] = self.client.get_queue_url(QueueName=name)["QueueUrl"]
        return self._urls[queue]

    def depth(self, queue: str) -> QueueDepth:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            attrs = self.client.get_queue_attributes(
                QueueUrl=self._url(queue), AttributeNames=list(self.ATTRIBUTES))["Attributes"]
        except ClientError as exc:
            self._urls.pop(queue, None)
            code = exc.response.get("Error", {}).get("Code", "")
            if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
                raise DepthUnavailable(f"sqs: no queue {sqs_queue_name(queue, self.prefix)!r}"
                                       ) from None
            raise DepthUnavailable(f"sqs depth probe failed: {exc}") from None
        except BotoCoreError as exc:
            raise DepthUnavailable(f"sqs depth probe failed: {exc}") from None
        return QueueDepth(queue, int(attrs.get(self.ATTRIBUTES[0], 0)),
                          int(attrs.get(self.ATTRIBUTES[1], 0)),
                          int(attrs.get(self.ATTRIBUTES[2], 0)), None, None, self.source,
                          self.clock())


def broker_sqs_config(settings: Settings) -> SqsClientConfig:
    """How to reach the SQS broker: credentials and endpoint from the settings or, as kombu
    reads them, from ``sqs://KEY:SECRET@host:port/``; bounded timeouts, two attempts."""
    parts = urlsplit(settings.broker_url)
    key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    if key is None and parts.username:  # sqs://KEY:SECRET@host/ as kombu reads it
        key = SecretStr(unquote(parts.username))
        secret = SecretStr(unquote(parts.password or ""))
    endpoint = settings.sqs_endpoint_url
    if endpoint is None and parts.hostname and parts.hostname != "localhost" and parts.port:
        endpoint = f"http://{parts.hostname}:{parts.port}"
    return SqsClientConfig(
        endpoint_url=endpoint,
        region=settings.sqs_region,
        access_key_id=key.get_secret_value() if key else None,
        secret_access_key=secret.get_secret_value() if secret else None,
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_attempts=2,
    )

