"""SQS (``sqs://``): kombu's SQS transport on boto3.

What differs here: no message priorities, no redelivery flag (a repeat looks like a first
delivery), a short visibility timeout that workers extend for what they hold
(:mod:`workers.visibility`), kombu's queue names (dots become dashes, a prefix per
environment), approximate depth counters, and a DLQ read with SQS's own calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from workers.brokers.base import BrokerAdapter
from workers.depth import DepthUnavailable, QueueDepth
from workers.sqs_deferral import SqsClientConfig, sqs_client

if TYPE_CHECKING:
    from workers.deadletter import DeadLetter, DeadLetters
    from workers.settings import Settings

__all__ = ["SQSBroker", "SQSDepthProbe", "broker_sqs_config", "sqs_queue_name"]


class SQSBroker(BrokerAdapter):
    name = "sqs"
    schemes = ("sqs",)
    provides_sqs = True
    batch_publish = "send_message_batch"

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

    def client(self, settings: Settings, *, timeout_s: float | None = None) -> Any:
        """A boto3 client of the broker's SQS (bounded timeouts, two attempts)."""
        config = broker_sqs_config(settings)
        if timeout_s:
            config = dataclasses.replace(config, connect_timeout=timeout_s,
                                         read_timeout=timeout_s)
        return sqs_client(config)

    def depth_probe(self, settings: Settings) -> SQSDepthProbe:
        return SQSDepthProbe(self.client(settings), prefix=settings.sqs_queue_prefix)

    def worker_threads(self, settings: Settings,
                       consumer: Any) -> list[tuple[str, float, Callable[[], Any]]]:
        """Extend the visibility of what this worker holds (workers.visibility), so the short
        visibility timeout returns only a dead worker's messages."""
        from workers.visibility import VisibilityExtender, held_messages

        extender = VisibilityExtender(self.client(settings), lambda: held_messages(consumer),
                                      settings.sqs_visibility_timeout_s)
        return [("tidegate-sqs-visibility", settings.worker_heartbeat_s, extender.extend)]

    def dead_letters(self, dls: DeadLetters, queue: str, limit: int | None) -> list[DeadLetter]:
        with _sqs_dlq(dls, queue) as sqs:
            return [record for _, record in sqs.receive_all(limit)]

    def take_dead_letters(self, dls: DeadLetters, queue: str,
                          select: Callable[[DeadLetter], bool],
                          handle: Callable[[DeadLetter], None]) -> Iterator[DeadLetter]:
        with _sqs_dlq(dls, queue) as sqs:
            for message, record in sqs.receive_all(None):
                if select(record):
                    handle(record)
                    sqs.delete(message)
                    yield record


@contextlib.contextmanager
def _sqs_dlq(dls: DeadLetters, queue: str) -> Iterator[_SqsDlq]:
    with dls.connection() as conn:
        channel = conn.channel()
        try:
            bound = dls.topology.dead_letter_kombu_queue(queue)(channel)
            bound.declare()
            sqs = _SqsDlq(channel, dls.topology.dead_letter_queue(queue))
            try:
                yield sqs
            finally:
                sqs.release_all()  # whatever was received and not taken: visible again
        finally:
            channel.close()  # nothing is unacked on it: _SqsDlq bypasses kombu's QoS


class _SqsDlq:
    """One DLQ on Celery's SQS transport, read with SQS's own calls.

    Why not kombu's ``basic_get`` as on RabbitMQ: a message taken and not acked on kombu's
    SQS channel is re-published as a copy when the channel closes, while the original stays
    hidden and comes back after the visibility timeout, so every ``dlq list`` would double
    the DLQ. Here a listing receives each message (hidden for ``HOLD_S`` so one pass sees
    distinct ones) and makes it visible again at the end; taking a record deletes it.
    """

    HOLD_S = 30

    def __init__(self, channel: Any, dlq: str) -> None:
        self.channel = channel
        self.dlq = dlq
        self.url = channel._new_queue(dlq)  # kombu's name mapping (prefix, "." -> "-")
        self.client = channel.sqs(dlq)
        self._held: dict[str, str] = {}  # message id -> receipt handle, to put back

    def receive_all(self, limit: int | None) -> list[tuple[dict[str, Any], DeadLetter]]:
        """Every message (up to ``limit``), oldest first, with its record."""
        from workers.deadletter import parse_envelope

        seen: dict[str, tuple[dict[str, Any], DeadLetter]] = {}
        while limit is None or len(seen) < limit:
            response = self.client.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=10, VisibilityTimeout=self.HOLD_S,
                WaitTimeSeconds=0, MessageSystemAttributeNames=["SentTimestamp"])
            fresh = [m for m in response.get("Messages", []) if m["MessageId"] not in seen]
            if not fresh:
                break
            for m in fresh:
                self._held[m["MessageId"]] = m["ReceiptHandle"]
                envelope = self.channel._message_to_python(m, self.dlq, self.url)
                seen[m["MessageId"]] = (m, parse_envelope(envelope, self.dlq))
        ordered = sorted(seen.values(),
                         key=lambda mr: int(mr[0].get("Attributes", {}).get("SentTimestamp", 0)))
        return ordered[:limit] if limit else ordered

    def delete(self, message: dict[str, Any]) -> None:
        self.client.delete_message(QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"])
        self._held.pop(message["MessageId"], None)

    def release_all(self) -> None:
        """Make every message still held visible again (else after HOLD_S)."""
        items = list(self._held.items())
        self._held.clear()
        for start in range(0, len(items), 10):
            chunk = items[start : start + 10]
            self.client.change_message_visibility_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                for i, (_, handle) in enumerate(chunk)])


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

