"""Queue for later on SQS: one queue of deferred requests per dependency, with its own DLQ.

:class:`SqsDeferralStore` is the :class:`~resilience.fallback.DeferralSink` that the
queue-for-later fallback writes to while a dependency is down, and the source the replayer
drains when it is back. Promises it keeps:

* ``defer`` returns only after SQS acknowledged the ``SendMessage``; an unreachable endpoint,
  a refused call or a too-large entry raises :class:`~resilience.errors.DeferralError`, so a
  request is never reported "deferred" unless it is in SQS;
* every entry carries an idempotency key (one is assigned when the request has none): replay
  is at-least-once at the queue, exactly-once at the dependency, and hinges on that key;
* a message the replayer cannot use (undecodable, unknown task) is simply not deleted: SQS
  redelivers it and, after ``maxReceiveCount`` receives, its redrive policy moves it to the DLQ.

Queues are created when missing (with the redrive policy and retention) or used as given when
configured by URL. The boto3 client has connect/read timeouts and bounded retries: no call
can hang (``workers.sqs_client``). What the queues are and what an entry holds:
``workers.deferral_format`` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from resilience import metrics
from resilience.errors import DeferralError
from resilience.fallback import DeferredRequest
from workers.deferral_format import (
    ENTRY_VERSION,
    SQS_MAX_BATCH,
    DeferredEntry,
    QueueStats,
    SqsQueueSpec,
    decode_entry,
    encode_entry,
    is_url,
)
from workers.deferral_format import SQS_MAX_RETENTION_S as SQS_MAX_RETENTION_S  # re-export
from workers.sqs_client import SqsClientConfig, sqs_client

__all__ = [
    "ENTRY_VERSION",
    "SQS_MAX_BATCH",
    "DeferredEntry",
    "DeferredEntryTooLarge",
    "QueueStats",
    "SqsClientConfig",
    "SqsDeferralStore",
    "SqsQueueSpec",
    "decode_entry",
    "encode_entry",
    "sqs_client",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 262_144  # SQS's historical default, used until the queue says

NEAR_RETENTION = metrics.get_or_create(
    metrics.Gauge,
    "tidegate_deferred_near_retention",
    "Deferred entries seen (last drain or listing) within the warning margin of the SQS "
    "retention period: they will be dropped by SQS unless replayed.",
    ("dependency",),
)
OLDEST_AGE = metrics.get_or_create(
    metrics.Gauge,
    "tidegate_deferred_oldest_age_seconds",
    "Age in SQS of the oldest deferred entry seen (last drain or listing).",
    ("dependency",),
)
REFRESHED = metrics.get_or_create(
    metrics.Counter,
    "tidegate_deferred_refreshed",
    "Deferred entries stored again as new SQS messages so that SQS retention cannot drop "
    "them while the dependency stays down.",
    ("dependency",),
)
DEFERRED_DEPTH = metrics.get_or_create(
    metrics.Gauge,
    "tidegate_deferred_depth",
    "Approximate number of deferred entries waiting in SQS, by queue (deferred or dlq).",
    ("dependency", "queue"),
)


class DeferredEntryTooLarge(DeferralError):
    """The encoded entry exceeds the SQS queue's MaximumMessageSize: it was not stored."""


@dataclass(frozen=True)
class _Resolved:
    url: str
    dlq_url: str
    max_bytes: int
    retention_s: int
    max_receive_count: int | None


class SqsDeferralStore:
    """Deferred requests of one dependency in SQS. Thread-safe; queues resolved lazily."""

    def __init__(self, spec: SqsQueueSpec, client: Any) -> None:
        self.spec = spec
        self.client = client
        self._lock = threading.Lock()
        self._resolved: _Resolved | None = None

    @property
    def dependency(self) -> str:
        return self.spec.dependency

    def __repr__(self) -> str:
        return f"SqsDeferralStore({self.spec.dependency!r}, queue={self.spec.queue!r})"

    # -- plumbing
    def _error(self, action: str, exc: BaseException) -> DeferralError:
        return DeferralError(
            f"{self.dependency}: {action} failed on SQS queue {self.spec.queue}: "
            f"{type(exc).__name__}: {exc}"
        )

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except DeferralError:
            raise
        except Exception as exc:  # botocore errors, sockets, credentials: all "not done"
            raise self._error(action, exc) from exc

    def _url_of(self, name_or_url: str, attributes: dict[str, str] | None) -> str:
        if is_url(name_or_url):
            return name_or_url
        try:
            return self.client.create_queue(QueueName=name_or_url, Attributes=attributes or {})[
                "QueueUrl"
            ]
        except Exception as exc:
            if "QueueAlreadyExists" not in str(exc) and "QueueNameExists" not in str(exc):
                raise
            # It exists with other attributes: adopt it and set ours below.
            return self.client.get_queue_url(QueueName=name_or_url)["QueueUrl"]

    def resolve(self) -> _Resolved:
        """Find (or create) both queues and read their limits. Retried until it succeeds."""
        resolved = self._resolved
        if resolved is not None:
            return resolved
        with self._lock:
            if self._resolved is None:
                self._resolved = self._call("resolving queues", self._resolve)
            return self._resolved

    def _resolve(self) -> _Resolved:
        spec = self.spec
        retention = {"MessageRetentionPeriod": str(spec.retention_s)}
        dlq_url = self._url_of(spec.dead_letter_queue, retention)
        if is_url(spec.queue):
            url = spec.queue
        else:
            dlq_arn = self.client.get_queue_attributes(
                QueueUrl=dlq_url, AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
            ours = {
                **retention,
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": spec.max_receive_count}
                ),
            }
            url = self._url_of(spec.queue, ours)
            self.client.set_queue_attributes(QueueUrl=url, Attributes=ours)
        attrs = self.client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["MaximumMessageSize", "MessageRetentionPeriod", "RedrivePolicy"],
        )["Attributes"]
        redrive = json.loads(attrs.get("RedrivePolicy") or "{}")
        if not redrive:
            log.warning("deferral queue %s has no redrive policy: poison entries never leave it",
                        url)
        return _Resolved(
            url=url,
            dlq_url=dlq_url,
            max_bytes=int(attrs.get("MaximumMessageSize", DEFAULT_MAX_MESSAGE_BYTES)),
            retention_s=int(attrs.get("MessageRetentionPeriod", spec.retention_s)),
            max_receive_count=int(redrive["maxReceiveCount"]) if redrive else None,
        )

    # -- DeferralSink
    def defer(self, request: DeferredRequest) -> str:
        """Store ``request``; return the SQS MessageId. DeferralError if it was NOT stored."""
        if request.dependency != self.dependency:
            raise DeferralError(
                f"request for {request.dependency!r} sent to the {self.dependency!r} deferral queue"
            )
        if not request.idempotency_key:
            request = replace(request, idempotency_key=f"deferred-{uuid.uuid4().hex}")
        try:
            body = encode_entry(request)
        except (TypeError, ValueError) as exc:
            raise DeferralError(
                f"{self.dependency}: request is not JSON-serialisable: {exc}"
            ) from exc
        resolved = self.resolve()
        size = len(body.encode())
        if size > resolved.max_bytes:
            raise DeferredEntryTooLarge(
                f"{self.dependency}: deferred entry is {size} bytes; the SQS queue's "
                f"MaximumMessageSize is {resolved.max_bytes} bytes"
            )
        response = self._call(
            "SendMessage", self.client.send_message, QueueUrl=resolved.url, MessageBody=body
        )
        message_id = response.get("MessageId")
        if not message_id:
            # Seen when the endpoint dies mid-response: the outcome is unknown, and the caller
            # must treat it like any other failed store (the replay is idempotent if it landed).
            raise DeferralError(
                f"{self.dependency}: SendMessage failed on SQS queue {self.spec.queue}: "
                "the response carried no MessageId (the entry may or may not be stored)"
            )
        return str(message_id)

    # -- replay side
    def receive(
        self, max_messages: int = SQS_MAX_BATCH, *, visibility_timeout: int, wait_s: int = 0
    ) -> list[DeferredEntry]:
        """Up to ``max_messages`` (<= 10) entries, hidden from others for the visibility timeout."""
        resolved = self.resolve()
        response = self._call(
            "ReceiveMessage",
            self.client.receive_message,
            QueueUrl=resolved.url,
            MaxNumberOfMessages=max(1, min(SQS_MAX_BATCH, max_messages)),
            VisibilityTimeout=visibility_timeout,
            WaitTimeSeconds=wait_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        return [self._entry(m) for m in response.get("Messages", [])]

    @staticmethod
    def _entry(message: dict[str, Any]) -> DeferredEntry:
        attrs = message.get("Attributes", {})
        body = message.get("Body", "")
        request, error = None, None
        try:
            request = decode_entry(body)
        except (ValueError, TypeError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return DeferredEntry(
            message_id=message["MessageId"],
            receipt_handle=message["ReceiptHandle"],
            receive_count=int(attrs.get("ApproximateReceiveCount", 1)),
            sent_at=int(attrs.get("SentTimestamp", 0)) / 1000.0,
            request=request,
            error=error,
            body_bytes=len(body.encode()),
        )

    def _batched(self, action: str, fn: Any, entries: Sequence[DeferredEntry],
                 item: Callable[[DeferredEntry], dict[str, Any]],
                 ) -> tuple[list[DeferredEntry], list[tuple[DeferredEntry, str]]]:
        """One SQS batch call per 10 entries: (entries SQS confirmed, [(entry, why not)]).

        Only an entry listed under ``Successful`` counts as done: a reply cut short (an
        empty 200, seen when an endpoint dies mid-response) confirms nothing.
        """
        resolved = self.resolve()
        done: list[DeferredEntry] = []
        failed: list[tuple[DeferredEntry, str]] = []
        for start in range(0, len(entries), SQS_MAX_BATCH):
            chunk = entries[start : start + SQS_MAX_BATCH]
            try:
                response = self._call(action, fn, QueueUrl=resolved.url, Entries=[
                    {"Id": str(i), **item(e)} for i, e in enumerate(chunk)])
            except DeferralError as exc:
                failed.extend((e, str(exc)) for e in chunk)
                continue
            ok = {int(x["Id"]) for x in response.get("Successful", [])}
            why = {int(x["Id"]): f"{x.get('Code')} {x.get('Message')}"
                   for x in response.get("Failed", [])}
            for i, e in enumerate(chunk):
                if i in ok:
                    done.append(e)
                else:
                    failed.append((e, why.get(i, "no answer from SQS")))
        return done, failed

    def delete(self, entries: Sequence[DeferredEntry]) -> list[DeferredEntry]:
        """Delete in batches of 10; return the entries SQS did NOT delete (they reappear)."""
        _, failed = self._batched("DeleteMessageBatch", self.client.delete_message_batch,
                                  entries, lambda e: {"ReceiptHandle": e.receipt_handle})
        for entry, why in failed:
            log.warning("%s: could not delete deferred entry %s: %s", self.dependency,
                        entry.message_id, why)
        return [entry for entry, _ in failed]

    def release(self, entries: Iterable[DeferredEntry]) -> None:
        """Make received entries visible again now (best effort: else after the timeout)."""
        _, failed = self._batched(
            "ChangeMessageVisibilityBatch", self.client.change_message_visibility_batch,
            list(entries), lambda e: {"ReceiptHandle": e.receipt_handle, "VisibilityTimeout": 0})
        if failed:
            log.warning("%s: %d entries reappear only after their visibility timeout: %s",
                        self.dependency, len(failed), failed[0][1])

    def refresh(self, entries: Sequence[DeferredEntry]) -> list[DeferredEntry]:
        """Store each received entry again as a new message, then delete the old one.

        SQS drops a message ``MessageRetentionPeriod`` after it was sent, however long its
        dependency stays down; a new copy starts that clock (and its receive count) over.
        The content is unchanged: same idempotency key, same deferral count and first
        deferral time. Returns the entries refreshed. Poison entries and entries SQS would
        not take again are released as they are; an entry copied but not deleted is stored
        twice, and the replay's idempotency key makes the second one harmless.
        """
        good = [e for e in entries if e.request is not None]
        copied, failed = self._batched(
            "SendMessageBatch", self.client.send_message_batch, good,
            lambda e: {"MessageBody": encode_entry(e.request)})  # type: ignore[arg-type]
        for entry, why in failed:
            log.warning("%s: could not store deferred entry %s again: %s", self.dependency,
                        entry.message_id, why)
        done = {e.message_id for e in copied}
        self.release([e for e in entries if e.message_id not in done])
        self.delete(copied)  # a failed delete leaves a harmless twin (same key)
        REFRESHED.labels(dependency=self.dependency).inc(len(copied))
        return copied

    def stats(self) -> QueueStats:
        resolved = self.resolve()
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateNumberOfMessagesDelayed"]
        main = self._call("GetQueueAttributes", self.client.get_queue_attributes,
                          QueueUrl=resolved.url, AttributeNames=names)["Attributes"]
        dead = self._call("GetQueueAttributes", self.client.get_queue_attributes,
                          QueueUrl=resolved.dlq_url, AttributeNames=names[:1])["Attributes"]
        stats = QueueStats(int(main.get(names[0], 0)), int(main.get(names[1], 0)),
                           int(main.get(names[2], 0)), int(dead.get(names[0], 0)))
        DEFERRED_DEPTH.labels(dependency=self.dependency, queue="deferred").set(stats.total)
        DEFERRED_DEPTH.labels(dependency=self.dependency, queue="dlq").set(stats.dead)
        return stats

    def peek(self, limit: int = 100, *, hold_s: int = 30,
             put_back: Callable[[list[DeferredEntry]], Any] | None = None,
             ) -> list[DeferredEntry]:
        """Look at up to ``limit`` entries without consuming them.

        SQS has no true peek: each entry is received (hidden for ``hold_s`` so one listing
        sees distinct entries) and handed to ``put_back`` at the end: ``release`` by default,
        which counts one receive toward the redrive policy's maxReceiveCount; ``refresh``
        stores each again with its count at 0 (``workers.deferred_ops.peek``).
        """
        seen: dict[str, DeferredEntry] = {}
        try:
            while len(seen) < limit:
                batch = self.receive(min(SQS_MAX_BATCH, limit - len(seen)),
                                     visibility_timeout=hold_s)
                fresh = [e for e in batch if e.message_id not in seen]
                if not fresh:
                    break
                seen.update((e.message_id, e) for e in fresh)
        finally:
            if seen:
                (put_back or self.release)(list(seen.values()))
        entries = sorted(seen.values(), key=lambda e: e.sent_at)
        self.observe_ages(entries)
        return entries

    # -- retention
    @property
    def retention_s(self) -> int:
        return self.resolve().retention_s

    def near_retention(self, entry: DeferredEntry, now: float | None = None) -> bool:
        """True when SQS will drop ``entry`` within the spec's warning margin."""
        return entry.age(now) >= self.retention_s - self.spec.near_retention_s

    def observe_ages(self, entries: Sequence[DeferredEntry]) -> None:
        """Publish the oldest age and the near-retention count of entries just seen."""
        if not entries:
            return
        now = time.time()
        OLDEST_AGE.labels(dependency=self.dependency).set(max(e.age(now) for e in entries))
        NEAR_RETENTION.labels(dependency=self.dependency).set(
            sum(self.near_retention(e, now) for e in entries)
        )
