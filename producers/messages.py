"""A batch's task messages built from one message Celery built, not by ``send_task`` per job.

Why: ``app.send_task`` does the same work for every job of a batch (routing, the protocol-2
message, kombu's ``publish`` with its serializer lookup and declarations, the event
dispatcher's ``task-sent`` publish with its own declaration), and that Python work, not the
broker, was the floor of ``enqueue_many`` (bench/RESULTS.md, issue 19).

How: for the first job of each (task, queue) in a batch, ``send_task`` runs as usual with
kombu's ``Producer._publish`` replaced by a recorder, so nothing is sent: what it records is
exactly what Celery would publish (the task message's serialized body, headers, properties,
exchange, routing key, declarations; then the ``task-sent`` event). Every job of the group,
that first one included, is then published by kombu's own ``Producer._publish`` from that
template with only what differs per job replaced: the task id (``id``, ``root_id`` where it
was the id, ``correlation_id``), ``argsrepr``/``kwargsrepr`` (Celery's ``saferepr`` with
Celery's limits), the body ``[args, kwargs, embed]`` (kombu's JSON serializer), the message
priority, Tidegate's own headers, and in the event ``uuid``, ``root_id``, ``args``,
``kwargs``, the Lamport ``clock`` and ``timestamp``. The transport's part (Redis priority
lists and signal token, the AMQP confirm channel, SQS's request) is untouched.

A template is used only after rebuilding its own job from it gives back byte for byte what
Celery built; otherwise, and whenever something could make jobs differ in ways a template does
not know (receivers of ``before_task_publish``/``after_task_publish``/``task_sent``, a result
backend that acts on ``on_task_call``, a protocol other than 2, a serializer other than JSON,
compression), the jobs go through ``send_task`` one by one as before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EventBatch", "MessageTemplate", "capture", "fast_path_usable", "flat_repr"]

# Where the per-job values sit in kombu's Producer._publish's positional arguments.
_BODY, _PRIORITY, _HEADERS, _PROPERTIES, _DECLARE = 0, 1, 4, 5, 10


def fast_path_usable(app: Any) -> bool:
    """Whether every job of a batch can be built from a template (see the module doc)."""
    from celery import signals
    from celery.backends.base import Backend

    conf = app.conf
    if conf.task_protocol != 2 or conf.task_serializer != "json" or conf.task_compression:
        return False
    if any(s.receivers for s in (signals.before_task_publish, signals.after_task_publish,
                                 signals.task_sent)):
        return False
    on_call = getattr(type(app.backend), "on_task_call", None)
    return on_call is Backend.on_task_call


def flat_repr(value: Any, maxlen: int | None, maxlevels: int | None) -> str | None:
    """Celery's ``saferepr(value, maxlen, maxlevels=...)`` of a flat list, tuple or dict (of
    str, int and float; dict keys str), or None for anything else (then ``saferepr``).

    Why: ``saferepr`` streams tokens through generators, about a tenth of a templated job's
    time for ``argsrepr`` and ``kwargsrepr``. For such values it yields the container's
    brackets, ``', '`` between items, ``': '`` after a key, each string quoted with only its
    single quotes escaped, each number as ``str``; it truncates only once the text reaches
    ``maxlen``, so a text shorter than that is exactly what it gives (tests/unit/
    test_batch_messages.py compares the two).
    """
    kind = type(value)
    if kind is dict:
        if not value:
            return "{}"
        parts = []
        for k, v in value.items():
            if type(k) is not str or (item := _scalar(v)) is None:
                return None
            parts.append("'" + k.replace("'", "\\'") + "': " + item)
        text = "{" + ", ".join(parts) + "}"
    elif kind is list or kind is tuple:
        items = [_scalar(v) for v in value]
        if None in items:
            return None
        text = ", ".join(items)  # type: ignore[arg-type]
        text = ("[" + text + "]" if kind is list else
                "(" + text + (",)" if len(items) == 1 else ")"))
    else:
        return None
    if maxlevels and maxlevels < 0:
        return None  # saferepr would cut the container itself
    if maxlen is not None and len(text) >= maxlen:
        return None
    return text


def _scalar(v: Any) -> str | None:
    kind = type(v)
    if kind is str:
        return "'" + v.replace("'", "\\'") + "'"
    if kind is int or kind is float:
        return str(v)
    return None


def _json_encoder() -> Callable[[Any], str]:
    """kombu's JSON serializer as one reusable encoder: ``kombu.utils.json.dumps`` builds a
    ``JSONEncoder`` with the default options per call; where the registry's JSON encoder is
    still kombu's own, one such encoder encodes the same text (errors go through kombu's
    serializer, which raises its own ``EncodeError``)."""
    from kombu.serialization import dumps, registry
    from kombu.utils import json as kombu_json

    def slow(value: Any) -> str:
        return dumps(value, serializer="json")[2]

    if registry._encoders.get("json", (None, None, None))[2] is not kombu_json.dumps:
        return slow
    encode = kombu_json.JSONEncoder().encode

    def fast(value: Any) -> str:
        try:
            return encode(value)
        except Exception:
            return slow(value)
    return fast


class _Recorder:
    """Stands in for ``Producer._publish``: keeps its arguments, sends nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def capture(producer: Any, send: Callable[[Any], None]) -> list[tuple[Any, ...]]:
    """What ``send(producer)`` (one ``send_task``) would hand kombu's ``Producer._publish``:
    the task message's arguments, then the ``task-sent`` event's (when events are on)."""
    recorder = _Recorder()
    producer._publish = recorder
    try:
        send(producer)
    finally:
        del producer._publish
    return recorder.calls


class MessageTemplate:
    """One (task, queue)'s messages from the arguments Celery handed kombu for one job."""

    def __init__(self, app: Any, calls: list[tuple[Any, ...]], task_id: str, args: Any,
                 kwargs: Any, own_headers: dict[str, Any]) -> None:
        from celery.utils.saferepr import saferepr

        self._json = _json_encoder()
        self._saferepr = saferepr
        self._repr_limits = (app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize,
                             app.conf.task_repr_maxlevels)
        self.clock = app.clock
        if len(calls) not in (1, 2):
            raise ValueError(f"{len(calls)} publishes for one task")
        self.task = calls[0]
        body, _, content_type, _, headers, properties = self.task[:6]
        if content_type != "application/json" or headers.get("id") != task_id:
            raise ValueError("not a JSON protocol-2 task message")
        self.embed = json.loads(body)[2]
        # Celery's own headers in Celery's order; Tidegate's are added per job after them
        self.headers = {k: v for k, v in headers.items() if k not in own_headers}
        self.root_is_id = headers.get("root_id") == task_id
        self.properties = dict(properties)
        self.event: tuple[Any, ...] | None = None
        self.event_fields: dict[str, Any] = {}
        if len(calls) == 2:
            self.event = calls[1]
            fields = json.loads(self.event[_BODY])
            if fields.get("type") != "task-sent" or fields.get("uuid") != task_id:
                raise ValueError("the second publish is not the task's task-sent event")
            self.event_fields = fields
            self.event_root_is_id = fields.get("root_id") == task_id
        self._declare = [self.task[_DECLARE], self.event[_DECLARE] if self.event else []]
        self.check(calls, task_id, args, kwargs, own_headers)

    def check(self, calls: list[tuple[Any, ...]], task_id: str, args: Any, kwargs: Any,
              own_headers: dict[str, Any]) -> None:
        """Rebuild the recorded job from the template: it must come out byte for byte."""
        event = self.event_fields
        built = self.build(task_id, args, kwargs, self.task[_PRIORITY], own_headers,
                           clock=event.get("clock"), timestamp=event.get("timestamp"))
        for mine, theirs in zip(built, calls, strict=True):
            if mine[:10] != theirs[:10] or mine[11:] != theirs[11:]:
                raise ValueError("a message rebuilt from its template differs from Celery's")
            if list(mine[4]) != list(theirs[4]) or list(mine[5]) != list(theirs[5]):
                raise ValueError("headers or properties rebuilt in another order")

    def build(self, task_id: str, args: Any, kwargs: Any, priority: int,
              own_headers: dict[str, Any], clock: Any = None, timestamp: float | None = None
              ) -> list[tuple[Any, ...]]:
        """``Producer._publish``'s arguments for one job: its task message, then its event."""
        args, kwargs = args or (), kwargs or {}  # as Celery's as_task_v2 does
        amax, kmax, levels = self._repr_limits
        argsrepr = flat_repr(args, amax, levels) or self._saferepr(args, amax, maxlevels=levels)
        kwargsrepr = flat_repr(kwargs, kmax, levels) or self._saferepr(kwargs, kmax,
                                                                       maxlevels=levels)
        headers = self.headers.copy()
        headers["id"] = task_id
        if self.root_is_id:
            headers["root_id"] = task_id
        headers["argsrepr"] = argsrepr
        headers["kwargsrepr"] = kwargsrepr
        headers.update(own_headers)
        properties = self.properties.copy()
        properties["correlation_id"] = task_id
        body = self._json((args, kwargs, self.embed))
        t = self.task
        out = [(body, priority, t[2], t[3], headers, properties, *t[6:10], self._declare[0],
                *t[11:])]
        if self.event is not None:
            fields = self.event_fields.copy()
            fields["uuid"] = task_id
            if self.event_root_is_id:
                fields["root_id"] = task_id
            fields["args"] = argsrepr
            fields["kwargs"] = kwargsrepr
            fields["clock"] = self.clock.forward() if clock is None else clock
            fields["timestamp"] = time.time() if timestamp is None else timestamp
            e = self.event
            out.append((self._json(fields), e[1], e[2], e[3],
                        dict(e[4]), dict(e[5]), *e[6:10], self._declare[1], *e[11:]))
        return out

    def publish(self, producer: Any, task_id: str, args: Any, kwargs: Any, priority: int,
                own_headers: dict[str, Any], events: EventBatch | None = None) -> None:
        """Publish one job through kombu's ``Producer._publish`` (the transport's own path);
        its ``task-sent`` event too, or into ``events`` to go out with the batch's others.

        Declarations ride with the group's first message only (kombu caches them anyway).
        """
        calls = self.build(task_id, args, kwargs, priority, own_headers)
        producer._publish(*calls[0])
        if len(calls) == 2:
            if events is None:
                producer._publish(*calls[1])
            else:
                events.add(calls[1])
        self._declare = [[], []]


class EventBatch:
    """A batch's ``task-sent`` events as one message: a list body routed ``task.multi``, the
    form Celery's own dispatcher gives buffered events (``EventDispatcher.flush``), which its
    ``EventReceiver`` (Flower, ``celery events``) reads event by event. One message instead of
    one per job: on RabbitMQ each is three frames and a confirm."""

    def __init__(self) -> None:
        self.call: tuple[Any, ...] | None = None
        self.bodies: list[Any] = []

    def add(self, call: tuple[Any, ...]) -> None:
        if self.call is None:
            self.call = call
        self.bodies.append(call[_BODY])

    def publish(self, producer: Any) -> None:
        """Publish the events added since the last call (none: nothing)."""
        if self.call is None or not self.bodies:
            return
        c, bodies = self.call, self.bodies
        self.bodies = []
        # the JSON list of the events' own JSON texts: what kombu's dumps gives for the list
        body = ("[" + ", ".join(bodies) + "]" if isinstance(bodies[0], str)
                else b"[" + b", ".join(bodies) + b"]")
        producer._publish(body, *c[1:6], "task.multi", *c[7:])
