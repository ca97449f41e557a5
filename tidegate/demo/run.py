"""One demo run: start the stack, run the storm, gather the records, account, write the report."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.demo import accounting, charts, report
from tidegate.demo.policy import Timings
from tidegate.demo.stack import DemoStack, running
from tidegate.demo.storm import StormRecord, run_storm

QUEUES = ("payments", "search", "email", "default")


@dataclass
class DemoResult:
    record: StormRecord
    accounting: accounting.Accounting
    replayer_stats: dict[str, Any] | None
    report_path: Path
    charts: list[Path]
    elapsed_s: float


def _settings(stack: DemoStack) -> Any:
    from workers.settings import load_settings

    env = stack.env
    return load_settings(
        broker_url=env["TIDEGATE_BROKER_URL"], redis_url=env["TIDEGATE_REDIS_URL"],
        policy_file=Path(env["TIDEGATE_POLICY_FILE"]),
        sqs_endpoint_url=env["TIDEGATE_SQS_ENDPOINT_URL"],
        aws_access_key_id=env["TIDEGATE_AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["TIDEGATE_AWS_SECRET_ACCESS_KEY"],
        deferral_queue_prefix=env["TIDEGATE_DEFERRAL_QUEUE_PREFIX"])


def gather(stack: DemoStack, settings: Any, state: Any, jobs: list[Any]) -> accounting.Records:
    """The system's records once the storm has drained."""
    import redis

    from workers.application import create_app
    from workers.deadletter import DeadLetters
    from workers.deferral import store_for
    from workers.replayer import replay_task_id

    app = create_app(settings)
    try:
        dlq = DeadLetters(app)
        dead = {q: dlq.list(q) for q in QUEUES}
    finally:
        app.close()
    store = store_for("email", settings)
    left = store.peek(limit=5000, hold_s=5) if store.stats().total else []
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        queued = accounting.queued_task_ids(broker, QUEUES)
    finally:
        broker.close()
    return accounting.Records(
        ledgers={n: stack.sims[n].ledger() for n in ("payments", "search", "email")},
        dead_letters=dead, still_deferred=left, marks=accounting.read_marks(state),
        email_worker_log=stack.worker_logs("email"), replay_task_id=replay_task_id,
        job_states=accounting.read_job_states(
            state, [replay_task_id(j.key) for j in jobs if j.task == "email.send" and j.key]
            + [j.id for j in jobs if j.task == "payments.charge" and j.id]),
        still_queued=queued)


def trace(logs: Path, job: Any) -> str:
    """Where a job was last mentioned in the processes' logs (for a job found nowhere)."""
    needles = [n for n in (job.id, job.key) if n]
    seen = []
    for path in sorted(logs.glob("*.log")):
        hits = [line for line in path.read_text(errors="replace").splitlines()
                if any(n in line for n in needles)]
        if hits:
            seen.append(f"{path.name}: {len(hits)} line(s), last: {hits[-1][-300:]}")
    return " | ".join(seen) or "never mentioned in the logs"


KILL_WINDOW = "lost at the SIGKILL"


def explain_missing(record: StormRecord, job: Any, seen: str) -> str:
    """Say what a job found nowhere looks like. One signature is known: accepted before the
    worker was SIGKILLed and never received by any worker. kombu's stock Redis transport pops
    a message (BRPOP) and records it as unacked in a second step; a worker killed between the
    two loses it. ``workers.transport`` closes that gap (docs/delivery.md); the label stays so
    a regression, or ``TIDEGATE_REDIS_RELIABLE_FETCH=false``, is named, never excused."""
    killed = record.killed_at
    answered = (job.answered_at - record.started_at) if job.answered_at else None
    never_received = "worker-" not in seen
    if killed is not None and answered is not None and answered <= killed + 1.0 \
            and never_received and job.task == "payments.charge":
        return (f"{KILL_WINDOW}: accepted at {answered:.1f}s, the payments worker was killed "
                f"at {killed:.1f}s, and no worker ever received it (popped from Redis, not yet "
                f"recorded as unacked); logs: {seen}")
    return f"no record anywhere; logs: {seen}"


def replayer_stats(log: str) -> dict[str, Any] | None:
    """The replayer's own tally, printed when it stops (``tidegate replayer``)."""
    found = re.findall(r"replayer email stopped: (\{.*\})", log)
    return json.loads(found[-1]) if found else None


def run_demo(duration: float, out: Path, *, exporter: bool = True,
             progress: Callable[[str], None] = print) -> DemoResult:
    import redis

    from tidegate.snapshot import Observer

    began = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings.for_duration(duration)
    with running(out, timings, exporter=exporter, progress=progress) as stack:
        settings = _settings(stack)
        state = redis.Redis.from_url(settings.redis_url, socket_timeout=5,
                                     socket_connect_timeout=2)
        observer = Observer(settings, ttl_s=0.0)
        record = run_storm(stack, observer, state, duration, progress)
        progress("reading the records: ledgers, dead-letter queues, SQS, idempotency marks")
        records = gather(stack, settings, state, record.jobs)
        state.close()
        replayer_proc = stack.proc("replayer")
        replayer_proc.stop()
        stats = replayer_stats(replayer_proc.output())
    acc = accounting.reconcile(record.jobs, records)
    for o in acc.outcomes:
        if o.outcome == "missing":
            o.evidence = explain_missing(record, o.job, trace(out / "logs", o.job))
    images = charts.write_all(out, record, acc, timings)
    path = report.write(out, record, acc, records, stats, timings, images)
    return DemoResult(record, acc, stats, path, images, time.monotonic() - began)
