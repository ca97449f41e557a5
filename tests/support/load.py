"""A steady mixed load for the drills, and per-job accounting from the simulators' ledgers.

:class:`MixedLoad` paces jobs of three kinds (keyed charges, unkeyed charges, ``search.index``)
through a real :class:`~producers.Producer`; each job carries its own id in its payload (the
charge's ``account``, the document's ``doc_id``), so the simulators' ledgers, which record
every application, tell how often each job took effect. :func:`account` then sorts every job:

* accepted: ``enqueue`` returned; refused: it raised (the caller knows, nothing promised);
* served: applied at its simulator; dead-lettered: a record in its queue's DLQ;
* lost: accepted, neither served nor dead-lettered; doubled: applied more than once;
* stall: the longest time during which an accepted job waited and nothing was applied.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

KINDS = ("keyed", "unkeyed", "index")


def _submit(producer: Any, kind: str, job: str) -> Any:
    if kind == "index":
        return producer.enqueue("search.index", [job], idempotency_key=None)
    if kind == "keyed":
        return producer.enqueue("payments.charge", [job], {"amount_cents": 100},
                                idempotency_key=job)
    return producer.enqueue("payments.charge", [job], {"amount_cents": 100})


class MixedLoad:
    """Enqueue ``rate`` jobs/s, kinds in turn, until stopped; records what was accepted."""

    def __init__(self, producer: Any, rate: float, prefix: str = "job",
                 kinds: tuple[str, ...] = KINDS) -> None:
        self.producer, self.interval, self.prefix, self.kinds = producer, 1.0 / rate, prefix, kinds
        self.accepted: dict[str, tuple[str, float]] = {}  # job -> (kind, wall time accepted)
        self.ids: dict[str, str] = {}  # job -> its task id (the job status API's id)
        self.refused: list[tuple[str, str]] = []  # (job, error)
        self.refusal_s: list[float] = []  # how long each refused enqueue took
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mixed-load")

    def _run(self) -> None:
        next_at, i = time.monotonic(), 0
        while not self._stop.is_set():
            kind = self.kinds[i % len(self.kinds)]
            job = f"{self.prefix}-{kind}-{i}"
            started = time.monotonic()
            try:
                result = _submit(self.producer, kind, job)
                self.accepted[job] = (kind, time.time())
                self.ids[job] = result.id
            except Exception as exc:  # refused: counted, never silently lost
                self.refused.append((job, f"{type(exc).__name__}: {exc}"))
                self.refusal_s.append(time.monotonic() - started)
            i += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> MixedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def job_of(application: dict[str, Any]) -> str | None:
    payload = application.get("payload") or {}
    return payload.get("account") or payload.get("doc_id")


def applications(sims: dict[str, Any], names: tuple[str, ...] = ("payments", "search")
                 ) -> list[dict[str, Any]]:
    """Every application at the named simulators, oldest first."""
    out = [a for n in names for a in sims[n].ledger()["applications"]]
    return sorted(out, key=lambda a: a["applied_at"])


def dead_letter_records(app: Any, queues: tuple[str, ...] = ("payments", "search")
                        ) -> dict[str, Any]:
    """Job id -> its dead-letter record (``workers.deadletter.DeadLetter``), from the DLQs of
    ``queues``."""
    from workers.deadletter import DeadLetters

    out = {}
    for queue in queues:
        for record in DeadLetters(app).list(queue):
            job = (record.args or [None])[0]
            if isinstance(job, str):
                out[job] = record
    return out


def dead_lettered(app: Any, queues: tuple[str, ...] = ("payments", "search")) -> dict[str, str]:
    """Job id -> dead-letter reason, from the DLQs of ``queues``."""
    return {job: record.reason for job, record in dead_letter_records(app, queues).items()}


def dead_letter_details(app: Any, queues: tuple[str, ...] = ("payments", "search"),
                        log: str = "", limit: int = 10) -> str:
    """The dead-letter records of ``queues``, one block each (reason, error, attempts, worker,
    task id, the traceback's last lines, and the lines of the worker's ``log`` that name the
    task): a drill that fails on a dead letter shows why it was dead-lettered, not just that
    it was."""
    blocks = []
    for job, r in sorted(dead_letter_records(app, queues).items())[:limit]:
        age = r.dead_lettered_at - (r.first_seen or r.dead_lettered_at)
        lines = [f"  {job}: {r.reason}: {r.exception_type}: {r.exception_message} "
                 f"(attempts {r.attempts}, worker {r.worker}, task {r.task_id}, "
                 f"dead-lettered {age:.1f} s after first seen)"]
        lines += [f"      {t}" for t in (r.traceback or "").strip().splitlines()[-6:]]
        if r.task_id:
            lines += [f"    log: {t[:400]}" for t in log.splitlines() if r.task_id in t][:12]
        blocks.append("\n".join(lines))
    return "\n".join(blocks) or "  (no dead-letter records)"


@dataclass
class Accounting:
    accepted: int
    refused: int
    served: int
    dead_lettered: int
    lost: list[str]
    doubled: dict[str, int]
    stall_s: float
    conflicts: int = 0  # 409s at the simulators: a second run of a key while one was running
    reasons: Counter = field(default_factory=Counter)
    served_unaccepted: int = 0  # refused to the caller, yet it landed (a lost confirm)

    def line(self) -> str:
        return (f"accepted {self.accepted}, served {self.served}, dead-lettered "
                f"{self.dead_lettered} {dict(self.reasons)}, lost {len(self.lost)}, doubled "
                f"{len(self.doubled)}, refused {self.refused} (of which served "
                f"{self.served_unaccepted}), 409s {self.conflicts}, longest stall "
                f"{self.stall_s:.1f} s")


def longest_stall(accepted: dict[str, tuple[str, float]], applied: list[dict[str, Any]],
                  done_at: dict[str, float], since: float = 0.0) -> float:
    """The longest gap between two applications (or the last one and now) during which some
    accepted job that was already waiting stayed undone; gaps ending before ``since`` (wall
    time: an outage the drill caused on purpose) do not count."""
    times = [since] if since else []
    times += [a["applied_at"] for a in applied if a["applied_at"] >= since]
    edges = list(itertools.pairwise(times))
    if times:
        edges.append((times[-1], time.time()))
    longest = 0.0
    for start, end in edges:
        if end - start <= longest:
            continue
        waiting = any(t < start and done_at.get(job, float("inf")) >= end
                      for job, (_, t) in accepted.items())
        if waiting:
            longest = end - start
    return longest


def account(load: MixedLoad, sims: dict[str, Any], app: Any, since: float = 0.0) -> Accounting:
    applied = applications(sims)
    per_job = Counter(job_of(a) for a in applied)
    first_applied: dict[str, float] = {}
    for a in applied:
        first_applied.setdefault(job_of(a) or "", a["applied_at"])
    dead = dead_lettered(app)
    done_at = dict(first_applied)
    for job in dead:
        done_at.setdefault(job, 0.0)  # settled: not waiting (its DLQ time is not needed here)
    accepted = dict(load.accepted)
    refused_jobs = {job for job, _ in load.refused}
    return Accounting(
        accepted=len(accepted), refused=len(refused_jobs),
        served=sum(1 for job in accepted if per_job[job]),
        dead_lettered=sum(1 for job in accepted if job in dead),
        lost=sorted(job for job in accepted if not per_job[job] and job not in dead),
        doubled={job: n for job, n in per_job.items() if n > 1},
        stall_s=longest_stall(accepted, applied, done_at, since),
        conflicts=sum(sims[n].ledger()["conflicts"] for n in ("payments", "search")),
        reasons=Counter(reason for job, reason in dead.items() if job in accepted),
        served_unaccepted=sum(1 for job in refused_jobs if per_job[job]),
    )


def settled(load: MixedLoad, sims: dict[str, Any], app: Any) -> bool:
    """Every accepted job applied at its simulator or dead-lettered."""
    done = {job_of(a) for a in applications(sims)}
    missing = [job for job in load.accepted if job not in done]
    return not missing or set(missing) <= set(dead_lettered(app))
