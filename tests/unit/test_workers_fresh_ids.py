"""When a delivery may skip reading its idempotency mark (``Execution.reads_mark``).

Only idempotent, unkeyed work on the first delivery of a task id the Producer generated, on
a broker that flags redeliveries: then no other message can carry the id, so no mark can be
there yet. Everything else reads the mark (duplicates and worker loss depend on it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from workers import headers as h
from workers.application import create_app
from workers.settings import load_settings


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, Any]]:
    made = {
        "redis": create_app(load_settings(broker_url="redis://127.0.0.1:6379/15")),
        "amqp": create_app(load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")),
        "sqs": create_app(load_settings(broker_url="sqs://127.0.0.1:1")),
    }
    for app in made.values():
        app.loader.import_default_modules()
    yield made
    for app in made.values():
        app.close()


def execution(app: Any, task_name: str, *, headers: dict[str, Any] | None = None,
              redelivered: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
    task = app.tasks[task_name]
    task.push_request(id="t-1", headers=headers or {}, hostname="w@h",
                      delivery_info={"routing_key": task.dependency, "redelivered": redelivered})
    try:
        return task._execution((), kwargs or {})
    finally:
        task.pop_request()


FRESH = {h.FRESH_ID: 1}


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_fresh_unkeyed_idempotent_work_skips_the_read(apps: dict[str, Any], broker: str) -> None:
    ex = execution(apps[broker], "search.index", headers=FRESH)
    assert ex.fresh and ex.idempotent and not ex.reads_mark


@pytest.mark.parametrize(("case", "kw"), [
    ("not idempotent: its started mark is what catches a lost worker",
     {"task_name": "payments.charge", "headers": FRESH}),
    ("keyed: the key may have been used before",
     {"task_name": "search.index", "headers": {**FRESH, h.IDEMPOTENCY_KEY: "k-1"}}),
    ("keyed by argument", {"task_name": "email.send", "headers": FRESH,
                           "kwargs": {"idempotency_key": "k-2"}}),
    ("redelivered: an earlier delivery may have finished",
     {"task_name": "search.index", "headers": FRESH, "redelivered": True}),
    ("the caller chose the task id (or no Tidegate producer sent it)",
     {"task_name": "search.index", "headers": {}}),
])
def test_everything_else_reads_the_mark(apps: dict[str, Any], case: str,
                                        kw: dict[str, Any]) -> None:
    name = kw.pop("task_name")
    assert execution(apps["redis"], name, **kw).reads_mark, case


def test_a_broker_that_does_not_flag_redeliveries_always_reads(apps: dict[str, Any]) -> None:
    ex = execution(apps["sqs"], "search.index", headers=FRESH)
    assert not ex.fresh and ex.reads_mark


def test_the_fresh_flag_is_not_carried_into_retries_or_replays() -> None:
    assert h.FRESH_ID not in h.ALL  # ALL is what retries, dead letters and replays copy
