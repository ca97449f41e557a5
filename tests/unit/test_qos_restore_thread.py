"""The prefetch restore after a reconnect runs on the consumer's loop thread, never on a pool
thread (workers.qos: Celery calls basic.qos from the acking thread otherwise)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery.worker.consumer import Consumer

from workers.poison import PoisonAwareConsumer
from workers.qos import RESTORE, LoopThreadQos


def test_celery_still_has_the_method_the_workaround_wraps() -> None:
    # A Celery upgrade that renames it would silently bypass workers.qos: fail here instead.
    assert callable(getattr(Consumer, RESTORE, None))
    assert issubclass(PoisonAwareConsumer, LoopThreadQos)


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> Any:
    calls: list[int] = []
    monkeypatch.setattr(Consumer, RESTORE, lambda self, p, *a: calls.append(threading.get_ident()))
    c = LoopThreadQos.__new__(LoopThreadQos)
    c.scheduled = []
    c.call_soon = lambda fn, *a, **k: c.scheduled.append(fn)
    c.connection_errors, c.channel_errors = (OSError,), ()
    c._loop_thread = threading.get_ident()  # what start() records
    c.calls = calls
    return c


def test_from_a_pool_thread_it_is_scheduled_on_the_loop(consumer: Any) -> None:
    pool_thread = threading.Thread(target=getattr(consumer, RESTORE), args=(None,))
    pool_thread.start()
    pool_thread.join(5)
    assert consumer.calls == [] and len(consumer.scheduled) == 1  # nothing ran off the loop
    consumer.scheduled[0]()  # the loop runs it
    assert consumer.calls == [threading.get_ident()]


def test_on_the_loop_thread_it_runs_at_once(consumer: Any) -> None:
    getattr(consumer, RESTORE)(None)
    assert consumer.calls == [threading.get_ident()] and consumer.scheduled == []
