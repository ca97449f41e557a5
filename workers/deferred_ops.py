"""Operator actions on a dependency's deferral queues that never harm what they hold.

SQS has no peek: every ReceiveMessage counts toward the redrive policy's maxReceiveCount, even
with VisibilityTimeout=0, so a listing that receives moves entries toward the dead-letter queue
(issue 17: 11 listings moved 2 deferred requests there). Counting uses queue attributes only.
Looking at entries is explicit and bounded (:func:`peek`): each entry seen is stored again as a
fresh copy and the received one deleted, which starts its receive count (and its retention
clock) over, exactly as the replayer does for entries near retention.

:func:`redrive` moves entries from the deferral DLQ back to the deferral queue with SQS's own
StartMessageMoveTask where the endpoint has it, else by receive, send, delete: copied first,
deleted after, so a failure in between leaves a twin with the same idempotency key (the
replay's idempotency makes it harmless), never a loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from resilience.errors import DeferralError
from workers.sqs_deferral import SQS_MAX_BATCH, DeferredEntry, SqsDeferralStore

__all__ = ["PEEK_MAX", "RedriveResult", "peek", "redrive"]

log = logging.getLogger(__name__)

PEEK_MAX = 100
HOLD_S = 60  # entries received by a peek or a manual redrive stay hidden this long at most


def peek(store: SqsDeferralStore, limit: int) -> list[DeferredEntry]:
    """Up to ``limit`` (<= PEEK_MAX) entries, oldest first, as they were before the peek.

    Each is received once and then stored again as a new message (new message id, receive
    count 0) and the received one deleted, so peeking never brings an entry closer to the DLQ.
    Poison entries (not decodable) are released as they are: they are on their way to the DLQ
    anyway. An entry SQS would not take again is released as it is (one receive counted).
    """
    # refresh releases what it could not store again
    return store.peek(max(0, min(PEEK_MAX, limit)), hold_s=HOLD_S, put_back=store.refresh)


@dataclass
class RedriveResult:
    method: str  # "StartMessageMoveTask" or "receive/send/delete"
    moved: int = 0  # copied to the deferral queue and deleted from the DLQ
    twins: int = 0  # copied but not deleted from the DLQ (same key: harmless if redriven)
    poison: int = 0  # not decodable: left in the DLQ
    failed: int = 0  # SQS would not take the copy: left in the DLQ
    task_handle: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [])}


def _arn(store: SqsDeferralStore, url: str) -> str:
    return store._call("GetQueueAttributes", store.client.get_queue_attributes, QueueUrl=url,
                       AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def redrive(store: SqsDeferralStore, limit: int | None = None, *,
            native: bool = True) -> RedriveResult:
    """Move up to ``limit`` entries (default: all) from the deferral DLQ back to its queue."""
    resolved = store.resolve()
    if native and limit is None:
        try:
            handle = store.client.start_message_move_task(
                SourceArn=_arn(store, resolved.dlq_url), DestinationArn=_arn(store, resolved.url))
            return RedriveResult("StartMessageMoveTask", moved=store.stats().dead,
                                 task_handle=handle.get("TaskHandle"),
                                 notes=["SQS moves the entries in the background"])
        except DeferralError:
            raise
        except Exception as exc:  # the endpoint lacks the API (moto: 500); move by hand
            if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError",
                                      "ReadTimeoutError", "NoCredentialsError"):
                raise store._error("StartMessageMoveTask", exc) from exc
            log.debug("%s: StartMessageMoveTask unavailable (%s); moving by receive/send/delete",
                      store.dependency, exc)
    result = RedriveResult("receive/send/delete")
    while limit is None or result.moved + result.twins < limit:
        want = SQS_MAX_BATCH if limit is None else min(SQS_MAX_BATCH,
                                                       limit - result.moved - result.twins)
        response = store._call(
            "ReceiveMessage", store.client.receive_message, QueueUrl=resolved.dlq_url,
            MaxNumberOfMessages=want, VisibilityTimeout=HOLD_S, WaitTimeSeconds=0,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"])
        entries = [store._entry(m) for m in response.get("Messages", [])]
        if not entries:
            break
        good = [e for e in entries if e.request is not None]
        result.poison += len(entries) - len(good)
        copied = _send_batch(store, resolved.url, good)
        result.failed += len(good) - len(copied)
        left = _delete_batch(store, resolved.dlq_url, copied)
        result.moved += len(copied) - left
        result.twins += left
        # Poison and uncopied entries reappear in the DLQ after HOLD_S: not received again in
        # this run, since they are hidden until then.
    if result.poison:
        result.notes.append(f"{result.poison} poison entries stay in the DLQ "
                            "(inspect them with the SQS console or CLI)")
    return result


def _send_batch(store: SqsDeferralStore, url: str, entries: list[DeferredEntry]
                ) -> list[DeferredEntry]:
    """The entries SQS confirmed storing in ``url`` (bodies as received)."""
    from workers.sqs_deferral import encode_entry

    done: list[DeferredEntry] = []
    for start in range(0, len(entries), SQS_MAX_BATCH):
        chunk = entries[start:start + SQS_MAX_BATCH]
        try:
            response = store._call("SendMessageBatch", store.client.send_message_batch,
                                   QueueUrl=url, Entries=[
                                       {"Id": str(i), "MessageBody": encode_entry(e.request)}
                                       for i, e in enumerate(chunk)])
        except DeferralError as exc:
            log.warning("%s: redrive could not store %d entries: %s", store.dependency,
                        len(chunk), exc)
            continue
        ok = {int(x["Id"]) for x in response.get("Successful", [])}
        done.extend(e for i, e in enumerate(chunk) if i in ok)
    return done


def _delete_batch(store: SqsDeferralStore, url: str, entries: list[DeferredEntry]) -> int:
    """Delete ``entries`` from ``url``; how many SQS did not confirm."""
    left = 0
    for start in range(0, len(entries), SQS_MAX_BATCH):
        chunk = entries[start:start + SQS_MAX_BATCH]
        try:
            response = store._call("DeleteMessageBatch", store.client.delete_message_batch,
                                   QueueUrl=url, Entries=[
                                       {"Id": str(i), "ReceiptHandle": e.receipt_handle}
                                       for i, e in enumerate(chunk)])
        except DeferralError as exc:
            log.warning("%s: redrive could not delete %d entries from the DLQ (they stay as "
                        "twins): %s", store.dependency, len(chunk), exc)
            left += len(chunk)
            continue
        left += len(chunk) - len(response.get("Successful", []))
    return left
