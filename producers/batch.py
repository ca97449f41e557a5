"""Publish a batch of jobs at broker speed, and say of each job whether the broker took it.

Each job is published through kombu's ``Producer._publish`` with the message Celery would
publish for it (headers, properties, protocol-2 body and ``task-sent`` event): built by
``app.send_task`` for one job per (task, queue), and for the others from that one
(:mod:`producers.messages`); only where the messages go differs:

* **Redis**: the transport hands each message's final commands (``LPUSH`` to the priority
  list, the reliable-fetch signal, ``PUBLISH`` of the event) to kombu's publish-batch hook
  (``_publish_batch``) instead of running them; they run as one ``MULTI``/``EXEC`` per queue,
  the signal rung once per queue with as many tokens as its jobs (``RING_MANY``).
  A transaction is all or nothing, so a queue's jobs are either all in or all out, and a
  command Redis refuses inside it (``WRONGTYPE``, out of memory) fails only its own job.
* **RabbitMQ**: the batch is published on a channel of its own in confirm mode without waiting
  per message, then every confirm is awaited once. Acks, nacks and returns (``mandatory``:
  no queue took it) are mapped back to the job by delivery tag and task id. Each message's
  frames are encoded here, byte for byte py-amqp's (:mod:`producers.amqp_frames`), and
  written in chunks of ``FLUSH_BYTES``: py-amqp's serialization of each message's ~25
  headers and its write per message were over half of a job's publish (bench/RESULTS.md).
  A message takes its delivery tag once encoded, so one that cannot be encoded fails alone;
  when a write fails, its messages and earlier ones whose confirm had not come are reported
  not confirmed (the broker may or may not hold them), and the jobs not yet written are not
  sent.

Either way a job counts as queued only once the broker confirmed it (``EXEC`` replied, or the
ack arrived); a job whose confirmation never came (connection lost) is reported as not
confirmed, never as queued.

* **SQS**: kombu encodes each message as for ``send_message``; the requests are
  ``SendMessageBatch`` calls of up to ten entries per queue, and each entry's result is its
  job's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .amqp_frames import FrameEncoder

__all__ = ["AmqpConfirms", "BatchOutcome", "NotConfirmed", "Refused", "redis_batch", "sqs_batch"]

Send = Callable[[Any], None]  # publishes one job through the kombu producer it is given
BatchOutcome = BaseException | None  # None: the broker confirmed the job
FLUSH_BYTES = 16 * 1024  # a RabbitMQ batch's frames are written in chunks of about this size

log = logging.getLogger(__name__)


class _Collect:
    """kombu's publish-batch hook: the Redis transport's ``_put`` hands it each command."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class _Intercept:
    """Stands in for kombu's batch state on one producer (``Producer.batch`` would run the
    commands itself, all in one non-transactional pipeline that says nothing per message)."""

    def __init__(self, collect: _Collect) -> None:
        self.collect = collect

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return channel.basic_publish(message, _publish_batch=self.collect, **kwargs)

    def flush(self) -> None:  # pragma: no cover - kombu's interface; nothing is buffered here
        return None


def redis_batch(producer: Any, jobs: Sequence[tuple[str, Send]],
                statuses: Sequence[tuple[Any, ...] | None] | None = None,
                dbs: tuple[int, int] | None = None) -> list[BatchOutcome]:
    """Publish ``(queue, send)`` jobs on kombu's Redis transport: one transaction per queue.

    ``statuses`` (one command or None per job) and ``dbs`` (the job-status database, the
    broker's): where job statuses live on the broker's own server, each published job's
    "queued" ``SET`` runs at the end of its queue's transaction (``SELECT`` there and back):
    no write of its own, and a status exists exactly when its message does. Their replies
    decide nothing (a status is best effort; ``NX`` may find a later one).
    """
    import redis

    from workers.transport import RING, RING_MANY

    collect = _Collect()
    commands: list[list[tuple[str, tuple[Any, ...]]] | BaseException] = []
    producer._batch_local.current = _Intercept(collect)
    try:
        for _, send in jobs:
            collect.commands = []
            try:
                send(producer)
            except Exception as exc:  # this job only (its commands are dropped)
                commands.append(exc)
            else:
                commands.append(collect.commands)
    finally:
        del producer._batch_local.current
    outcomes: list[BatchOutcome] = [c if isinstance(c, BaseException) else None
                                    for c in commands]
    by_queue: dict[str, list[int]] = {}
    for i, (queue, _) in enumerate(jobs):
        if outcomes[i] is None:
            by_queue.setdefault(queue, []).append(i)
    with producer.channel.conn_or_acquire() as client:
        for indices in by_queue.values():
            pipe = client.pipeline(transaction=True)
            spans = []
            rings: dict[Any, list[Any]] = {}  # signal list -> [count, cap, ttl]
            for i in indices:
                job_commands = commands[i]
                assert not isinstance(job_commands, BaseException)
                n = 0
                for name, args in job_commands:
                    if name == "eval" and args and args[0] is RING:  # rung once per list below
                        ring = rings.setdefault(args[2], [0, *args[3:5]])
                        ring[0] += 1
                        continue
                    getattr(pipe, name)(*args)
                    n += 1
                spans.append((i, n))
            for key, (count, cap, ttl) in rings.items():
                # the signal tokens (hints: a consumer finds untokened messages within its
                # BRPOP timeout), so a failure here fails no job
                pipe.eval(RING_MANY, 1, key, count, cap, ttl)
            tail = [c for i in indices if statuses and (c := statuses[i]) is not None]
            if tail and dbs is not None:
                pipe.execute_command("SELECT", dbs[0])
                for command in tail:
                    pipe.execute_command(*command)
                pipe.execute_command("SELECT", dbs[1])
            try:
                replies = pipe.execute(raise_on_error=False)
            except (redis.RedisError, OSError) as exc:  # EXEC aborted, or no reply
                for i in indices:
                    outcomes[i] = exc
                continue
            finally:
                pipe.reset()
            at = 0
            for i, n in spans:
                failed = [r for r in replies[at:at + n] if isinstance(r, Exception)]
                outcomes[i] = failed[0] if failed else None
                at += n
    return outcomes


SQS_BATCH = 10  # SendMessageBatch takes at most ten entries
SQS_BATCH_BYTES = 256 * 1024  # ... and at most this many bytes of bodies and attributes


class _SqsRecorder:
    """Stands in for the boto3 client kombu's SQS ``_put`` sends with: keeps each
    ``send_message``'s arguments (kombu's own encoding) for ``SendMessageBatch``."""

    def __init__(self, client: Any, sent: list[tuple[Any, dict[str, Any]]]) -> None:
        self._client, self._sent = client, sent

    def send_message(self, **kwargs: Any) -> None:
        self._sent.append((self._client, kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def sqs_batch(producer: Any, jobs: Sequence[tuple[str, Send]]) -> list[BatchOutcome]:
    """Publish ``(queue, send)`` jobs on kombu's SQS transport with ``SendMessageBatch``,
    up to ten per request; each entry's own success or failure is its job's."""
    channel = producer.channel
    real = channel.sqs
    sent: list[tuple[Any, dict[str, Any]]] = []
    channel.sqs = lambda queue=None: _SqsRecorder(real(queue=queue), sent)
    outcomes: list[BatchOutcome] = [None] * len(jobs)
    entries: dict[str, list[tuple[int, Any, dict[str, Any]]]] = {}
    try:
        for i, (_, send) in enumerate(jobs):
            sent.clear()
            try:
                send(producer)
            except Exception as exc:
                outcomes[i] = exc
                continue
            for client, kwargs in sent:
                entries.setdefault(kwargs["QueueUrl"], []).append((i, client, kwargs))
    finally:
        del channel.sqs
    for url, items in entries.items():
        for chunk in _sqs_chunks(items):
            client = chunk[0][1]
            request = [{"Id": str(n), **{k: v for k, v in kw.items() if k != "QueueUrl"}}
                       for n, (_, _, kw) in enumerate(chunk)]
            try:
                reply = client.send_message_batch(QueueUrl=url, Entries=request)
            except Exception as exc:  # the request failed as a whole
                for i, _, _ in chunk:
                    outcomes[i] = exc
                continue
            for failed in reply.get("Failed", []):
                i = chunk[int(failed["Id"])][0]
                outcomes[i] = Refused(f"SQS refused the message: {failed.get('Code')}: "
                                      f"{failed.get('Message')}")
    return outcomes


def _sqs_chunks(items: list[tuple[int, Any, dict[str, Any]]]
                ) -> Iterator[list[tuple[int, Any, dict[str, Any]]]]:
    chunk: list[tuple[int, Any, dict[str, Any]]] = []
    size = 0
    for item in items:
        n = len(str(item[2].get("MessageBody", ""))) + len(str(item[2].get(
            "MessageAttributes") or ""))
        if chunk and (len(chunk) == SQS_BATCH or size + n > SQS_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


class Refused(Exception):
    """The broker refused this one message (an SQS batch entry that failed)."""


class NotConfirmed(Exception):
    """The broker did not confirm the message in time (it may or may not have it)."""


class Nacked(Exception):
    """The broker refused the message (basic.nack)."""


class AmqpConfirms:
    """A channel of its own in confirm mode, kept on one pooled connection: publish a batch
    without waiting, then wait once for all its confirms."""

    ATTR = "_tidegate_batch_channel"

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # kombu Connection
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel._confirm_selected = True
        self.next_tag = 1
        self.channel.basic_publish = self._publish  # publish without waiting for its confirm
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._owner: dict[int, int] = {}
        self._first: dict[int, int] = {}  # job -> tag of its task message (first publish)
        self._ids: dict[str, int] = {}
        self._current = -1
        self._outcomes: list[BatchOutcome] = []
        self._unconfirmed: set[int] = set()
        # a batch's frames, encoded here and written in chunks (producers/amqp_frames.py);
        # None once a message came out other than py-amqp's own: py-amqp writes them all
        from .amqp_frames import FrameEncoder  # py-amqp's: imported where RabbitMQ is used

        self._frames: FrameEncoder | None = FrameEncoder(self.channel.channel_id)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._buffering = False
        self._verify = False
        self._timeout: float | None = None

    @classmethod
    def for_connection(cls, connection: Any) -> AmqpConfirms:
        """The confirm channel cached on ``connection`` (a new one after a reconnect)."""
        state = getattr(connection, cls.ATTR, None)
        if (state is None or not state.channel.is_open
                or state.channel.connection is not connection.connection):
            state = cls(connection)
            setattr(connection, cls.ATTR, state)
        return state

    def discard(self) -> None:
        if getattr(self.connection, self.ATTR, None) is self:
            setattr(self.connection, self.ATTR, None)
        with contextlib.suppress(Exception):  # already closed with its connection
            self.channel.close()

    # -- py-amqp callbacks
    def _publish(self, msg: Any, exchange: str = "", routing_key: str = "",
                 mandatory: bool = False, immediate: bool = False, timeout: float | None = None,
                 confirm_timeout: float | None = None) -> Any:
        """``basic_publish`` without waiting for the confirm: in a batch, the message's frames
        join the batch's next write; else (or a body py-amqp splits) py-amqp writes them."""
        frames = None
        if self._buffering and self._frames is not None:
            frames = self._encode(msg, exchange, routing_key, mandatory, immediate)
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self._owner[tag] = self._current
        self._first.setdefault(self._current, tag)
        self._unconfirmed.add(tag)
        if frames is None:
            self.flush(timeout)  # what came before goes first
            return self.channel._basic_publish(msg, exchange, routing_key, mandatory,
                                               immediate, timeout)
        self._timeout = timeout
        self._pending.append(frames)
        self._pending_size += len(frames)
        if self._pending_size >= FLUSH_BYTES:
            self.flush(timeout)
        return None

    def _encode(self, msg: Any, *route: Any) -> bytes | None:
        """The message's frames (None: py-amqp writes it). Raises before the message takes a
        delivery tag, so a message that cannot be encoded fails its own job only."""
        from .amqp_frames import reference_frames

        conn = self.channel.connection
        if conn is None:
            from amqp.exceptions import RecoverableConnectionError

            raise RecoverableConnectionError("basic_publish: connection closed")
        frame_max, channel_id = conn.frame_max, self.channel.channel_id
        assert self._frames is not None
        try:
            frames = self._frames.frames(msg, *route, frame_max)
        except Exception:  # py-amqp's own encoding, and its own error for what it refuses
            return reference_frames(msg, channel_id, *route, frame_max)
        if frames is not None and self._verify:  # once per batch: py-amqp's bytes, exactly
            self._verify = False
            expected = reference_frames(msg, channel_id, *route, frame_max)
            if frames != expected:
                log.warning("batch frames differ from py-amqp's; py-amqp encodes from now on")
                self._frames = None
                return expected
        return frames

    def flush(self, timeout: float | None = None) -> None:
        """Write the frames collected so far in one socket write (py-amqp's write path: its
        write timeout, its blocked-connection check, its sent-frames count for heartbeats)."""
        if not self._pending:
            return
        data, count = b"".join(self._pending), len(self._pending)
        self._pending, self._pending_size = [], 0
        conn = self.channel.connection
        from amqp.exceptions import RecoverableConnectionError

        if conn is None:
            raise RecoverableConnectionError("basic_publish: connection closed")
        if conn.client_properties.get("capabilities", {}).get("connection.blocked", False):
            with contextlib.suppress(TimeoutError):  # handle a connection.blocked first
                conn.drain_events(timeout=0)
        try:
            with conn.transport.having_timeout(timeout):
                conn.transport.write(data)
        except TimeoutError:  # as py-amqp: a write timeout is a dead socket
            raise RecoverableConnectionError("basic_publish: timed out") from None
        conn.bytes_sent += count

    def _settle(self, delivery_tag: int, multiple: bool, error: BaseException | None) -> None:
        tags = ([t for t in self._unconfirmed if t <= delivery_tag] if multiple
                else [delivery_tag])
        for tag in tags:
            self._unconfirmed.discard(tag)
            job = self._owner.pop(tag, -1)
            if error is not None and 0 <= job < len(self._outcomes) \
                    and self._first.get(job) == tag and self._outcomes[job] is None:
                self._outcomes[job] = error

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, Nacked("the broker refused the message (nack)"))

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str,
                   message: Any) -> None:
        task_id = (getattr(message, "properties", None) or {}).get("correlation_id")
        job = self._ids.get(task_id or "")
        if job is not None and self._outcomes[job] is None:
            self._outcomes[job] = exc  # its ack follows; the return decides

    # -- the batch
    def publish(self, producer: Any, jobs: Sequence[tuple[str, Send]], task_ids: Sequence[str],
                timeout_s: float, after: Send | None = None) -> list[BatchOutcome]:
        """Publish every job, then ``after`` (the batch's events: a failure there fails no job
        unless it lost the connection), then wait up to ``timeout_s`` for all the confirms."""
        self._outcomes = [None] * len(jobs)
        self._ids = {tid: i for i, tid in enumerate(task_ids)}
        self._first, self._owner, self._unconfirmed = {}, {}, set()
        sent = [False] * len(jobs)
        if self._frames is not None:
            self._frames.reset()
        self._buffering, self._verify, self._timeout = True, True, None
        try:
            with _corked(self.connection) if self._frames is None else contextlib.nullcontext():
                broken = self._send_all(producer, jobs, sent)
                if broken is None and after is not None:
                    self._current = -1  # no job's: its ack or nack decides nothing
                    try:
                        after(producer)
                    except Exception as exc:
                        if _connection_error(exc):
                            broken = exc
                if broken is None:
                    try:
                        self.flush(self._timeout)
                    except Exception as exc:  # the jobs in this write were sent, or not
                        broken = exc
        finally:
            self._buffering, self._pending, self._pending_size = False, [], 0
        deadline = time.monotonic() + timeout_s
        while self._unconfirmed and broken is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self.connection.drain_events(timeout=remaining)
            except TimeoutError:
                break
            except Exception as exc:  # connection or channel closed: the rest is unknown
                broken = exc
        waiting = {self._owner[t] for t in self._unconfirmed if t in self._owner}
        for job in waiting:
            if job >= 0 and sent[job] and self._outcomes[job] is None and self._first.get(job) in \
                    self._unconfirmed:
                self._outcomes[job] = NotConfirmed(
                    f"connection lost before its confirm ({broken})" if broken else
                    f"no confirm from the broker within {timeout_s:.1f}s")
        if broken is not None or self._unconfirmed:
            self.discard()  # its tags are out of step with the broker now
        return self._outcomes

    def _send_all(self, producer: Any, jobs: Sequence[tuple[str, Send]], sent: list[bool]
                  ) -> BaseException | None:
        """Publish each job; stop at the first error that leaves the channel unusable."""
        for i, (_, send) in enumerate(jobs):
            self._current = i
            try:
                send(producer)
                sent[i] = True
            except Exception as exc:
                if i in self._first or _connection_error(exc):  # the channel is gone
                    for j in range(i, len(jobs)):
                        self._outcomes[j] = exc
                    return exc
                self._outcomes[i] = exc  # refused before it reached the wire: this job only
        return None


@contextlib.contextmanager
def _corked(connection: Any) -> Iterator[None]:
    """Hold the batch's frames in the kernel until it is all written (Linux ``TCP_CORK``):
    sent frame by frame, each write costs a loaded loopback about a millisecond. Only where
    py-amqp writes every message (the batch's own encoder turned off after a mismatch)."""
    sock = getattr(getattr(connection.connection, "_transport", None), "sock", None)
    cork = getattr(socket, "TCP_CORK", None)
    try:
        if sock is not None and cork is not None:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:
        sock = None
    try:
        yield
    finally:
        if sock is not None and cork is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


def _connection_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    return isinstance(exc, OperationalError | OSError | ConnectionError) or \
        type(exc).__name__ in {"RecoverableConnectionError", "ConnectionForced"}
