"""Where every job of the storm ended, read from the system's own records.

For each request the flood made, the API's answer says whether it got in (202 queued or
deferred) or was refused (503 shed, 429 rate limited). For each job that got in, the outcome is
looked up, by idempotency key (or task id for an unkeyed charge), in:

* the downstream simulators' ledgers: the effect was applied (and when, and how often the key
  was attempted);
* the dead-letter queues: the DLQ record, with its reason;
* the SQS deferral queue: still waiting to be replayed;
* the idempotency marks in Redis: done / dead / started, as a cross-check;
* the email workers' log: which tasks a worker queued for later ("deferred as ...");
* the job statuses in Redis (``workers.jobs``): which replays (task id derived from the
  idempotency key, ``workers.replayer.replay_task_id``) a worker took up. Celery's "Task ...
  received" line is not used: it is below INFO since the quiet logs (``workers.logs``).

Then ``jobs in = served + shed (503) + rate limited (429) + dead-lettered + still deferred``,
and any accepted job found in none of those records is listed as missing: that would be a loss.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidegate.demo.storm import Job
from workers.topology import redis_priority_lists

SIM_FOR_TASK = {"payments.charge": "payments", "search.index": "search", "email.send": "email"}
PRIORITIES = ("critical", "high", "medium", "low")
OUTCOMES = ("served", "shed_503", "rate_limited_429", "dead_lettered", "still_deferred",
            "still_queued", "refused_other", "unanswered", "missing")
_DEFERRED_LOG = re.compile(r"email\.send\[([0-9a-f-]{36})\]: \w+ unavailable; deferred as")
# Job states only a worker writes: the task was delivered to one (``queued`` is the replayer's).
_TAKEN_UP = frozenset({"running", "retrying", "succeeded", "failed", "dead_lettered",
                       "deferred"})


@dataclass
class Outcome:
    """One job's fate, with the evidence it was read from."""

    job: Job
    outcome: str
    evidence: str
    deferred_by: str | None = None  # "api" or "worker": it spent time in SQS
    replayed: bool = False
    effect_applied: bool = False
    attempts_downstream: int = 0  # requests the downstream saw for this job's key
    dlq_reason: str | None = None
    dlq_queue: str | None = None
    mark: str | None = None  # idempotency mark state at the end
    seconds_to_effect: float | None = None
    # what the job's status (GET /v1/jobs/{id}) tells its user once it failed, where the
    # dependency's fallback is graceful: "not_attempted" / "unknown", and the words
    told: str | None = None
    told_message: str | None = None


@dataclass
class Records:
    """The system's records, gathered once the storm has drained."""

    ledgers: Mapping[str, Mapping[str, Any]]  # simulator name -> GET /ledger
    dead_letters: Mapping[str, list[Any]]  # work queue -> DeadLetter records
    still_deferred: list[Any]  # DeferredEntry left in SQS
    marks: Mapping[str, Mapping[str, Any]]  # "task:kind:value" -> mark record
    email_worker_log: str
    replay_task_id: Any  # callable: idempotency key -> the replay's task id
    job_states: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # id -> status
    still_queued: frozenset[str] = frozenset()  # task ids in a broker queue or held unacked


@dataclass
class Accounting:
    outcomes: list[Outcome]
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    unexpected_effects: dict[str, list[str]] = field(default_factory=dict)

    @property
    def by_outcome(self) -> Counter:
        return Counter(o.outcome for o in self.outcomes)

    def table(self) -> dict[str, Counter]:
        """priority -> outcome counts."""
        out: dict[str, Counter] = {p: Counter() for p in PRIORITIES}
        for o in self.outcomes:
            out[o.job.priority][o.outcome] += 1
        return out

    @property
    def balanced(self) -> bool:
        counts = self.by_outcome
        return sum(counts.values()) == len(self.outcomes) and counts["missing"] == 0

    @property
    def ok(self) -> bool:
        return self.balanced and all(passed for _, passed, _ in self.checks)


def ledger_key(job: Job) -> str | None:
    """The key the downstream recorded the job's effect under (see workers/tasks)."""
    return job.key or (job.id if job.task == "payments.charge" else None)


def mark_id(job: Job) -> str | None:
    if job.key:
        return f"{job.task}:key:{job.key}"
    return f"{job.task}:task:{job.id}" if job.id else None


def queued_task_ids(broker: Any, queues: Iterable[str]) -> frozenset[str]:
    """Task ids of the messages still in the broker's Redis: ready (every priority list) or
    delivered and not acked (kombu's ``unacked`` hash, where held retries wait too)."""
    raw: list[Any] = []
    for q in queues:
        for key in redis_priority_lists(q):
            raw.extend(broker.lrange(key, 0, -1))
    raw.extend(json.loads(v)[0] for v in broker.hvals("unacked"))
    ids = set()
    for message in raw:
        doc = json.loads(message) if isinstance(message, str | bytes) else message
        task_id = (doc.get("headers") or {}).get("id")
        if task_id:
            ids.add(task_id)
    return frozenset(ids)


def read_marks(state: Any) -> dict[str, dict[str, Any]]:
    """Every idempotency mark: ``task:key:K`` / ``task:task:ID`` -> its record."""
    prefix = "tidegate:idem:"
    out = {}
    for key in state.scan_iter(match=prefix + "*", count=1000):
        raw = state.get(key)
        if raw:
            out[key.decode()[len(prefix):]] = json.loads(raw)
    return out


def read_job_states(state: Any, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The job status (``workers.jobs``) of each of ``ids`` that has one."""
    from workers.jobs import job_key

    ids = list(dict.fromkeys(ids))
    out = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for job_id, raw in zip(chunk, state.mget([job_key(i) for i in chunk]), strict=True):
            if raw:
                out[job_id] = json.loads(raw)
    return out


def _index_dead_letters(records: Mapping[str, list[Any]]) -> dict[str, tuple[str, Any]]:
    index: dict[str, tuple[str, Any]] = {}
    for queue, items in records.items():
        for r in items:
            for ident in (r.idempotency_key, r.task_id):
                if ident:
                    index.setdefault(ident, (queue, r))
    return index


def reconcile(jobs: Iterable[Job], rec: Records) -> Accounting:
    jobs = list(jobs)
    dlq = _index_dead_letters(rec.dead_letters)
    effects = {sim: led.get("effects", {}) for sim, led in rec.ledgers.items()}
    failed = {sim: led.get("failed_attempts", {}) for sim, led in rec.ledgers.items()}
    deferred_keys = {e.request.idempotency_key for e in rec.still_deferred if e.request}
    worker_deferred = set(_DEFERRED_LOG.findall(rec.email_worker_log))
    received = {job_id for job_id, doc in rec.job_states.items()
                if doc.get("state") in _TAKEN_UP}
    outcomes = []
    claimed: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        sim = SIM_FOR_TASK[job.task]
        lkey = ledger_key(job)
        if lkey:
            claimed[sim].add(lkey)
        outcomes.append(_one(job, sim, lkey, effects[sim], failed[sim], dlq, deferred_keys,
                             worker_deferred, received, rec))
    acc = Accounting(outcomes)
    acc.unexpected_effects = {sim: sorted(set(eff) - claimed[sim])
                              for sim, eff in effects.items() if set(eff) - claimed[sim]}
    _checks(acc)
    return acc


def _one(job: Job, sim: str, lkey: str | None, effects: Mapping[str, Any],
         failed: Mapping[str, int], dlq: Mapping[str, tuple[str, Any]], deferred_keys: set,
         worker_deferred: set, received: set, rec: Records) -> Outcome:
    effect = effects.get(lkey) if lkey else None
    found = (dlq.get(job.key) if job.key else None) or (dlq.get(job.id) if job.id else None)
    o = Outcome(job, "missing", "no record anywhere")
    o.effect_applied = effect is not None
    o.attempts_downstream = (effect or {}).get("requests", 0) + failed.get(lkey or "", 0)
    mark = rec.marks.get(mark_id(job) or "")
    o.mark = mark.get("s") if mark else None
    if job.status == 503:  # refused: final, whatever else is found (a check looks at that)
        o.outcome, o.evidence = "shed_503", f"API answered 503 ({job.error})"
        return o
    if job.status == 429:
        o.outcome, o.evidence = "rate_limited_429", "API answered 429 (client over its rate)"
        return o
    if job.task == "email.send":
        if job.state == "deferred":
            o.deferred_by = "api"
        elif job.id in worker_deferred:
            o.deferred_by = "worker"
        if job.key and rec.replay_task_id(job.key) in received:
            o.replayed = True
            o.deferred_by = o.deferred_by or "worker"
    if effect is not None:
        o.seconds_to_effect = round(effect["applied_at"] - job.sent_at, 3)
    status = rec.job_states.get(job.id or "") or {}
    if status.get("outcome"):
        o.told, o.told_message = status["outcome"], status.get("message")
    if found is not None:
        queue, record = found
        o.outcome, o.dlq_queue, o.dlq_reason = "dead_lettered", queue, record.reason
        o.evidence = f"DLQ {queue}.dlq record {record.id}: {record.reason}"
    elif effect is not None:
        o.outcome, o.evidence = "served", f"{sim} ledger: effect under {lkey}"
    elif job.key and job.key in deferred_keys:
        o.outcome, o.evidence = "still_deferred", "SQS deferral queue"
    elif job.id in rec.still_queued or (
            job.key and rec.replay_task_id(job.key) in rec.still_queued):
        o.outcome, o.evidence = "still_queued", "in a broker queue (ready or held unacked)"
    elif job.status is None:
        o.outcome, o.evidence = "unanswered", f"no answer from the API ({job.error})"
    elif job.status != 202:
        o.outcome, o.evidence = "refused_other", f"API answered {job.status} ({job.error})"
    return o


def _checks(acc: Accounting) -> None:
    outs = acc.outcomes
    missing = [o for o in outs if o.outcome == "missing"]
    acc.checks.append(("every accepted job is served, dead-lettered, or still queued / deferred",
                       not missing, f"{len(missing)} missing" if missing else "0 missing"))
    crit_shed = [o for o in outs if o.job.priority == "critical"
                 and o.outcome in ("shed_503", "rate_limited_429")]
    acc.checks.append(("CRITICAL never shed", not crit_shed, f"{len(crit_shed)} shed"))
    refused_ran = [o for o in outs if o.outcome in ("shed_503", "rate_limited_429")
                   and o.job.key and o.effect_applied]
    acc.checks.append(("nothing refused with 503/429 ran anyway", not refused_ran,
                       f"{len(refused_ran)} ran"))
    unkeyed = [o for o in outs if o.job.task == "payments.charge" and not o.job.key
               and o.job.status == 202]
    twice = [o for o in unkeyed if o.attempts_downstream > 1]
    acc.checks.append(("no unkeyed (non-idempotent) charge sent to the provider twice",
                       not twice, f"{len(unkeyed)} unkeyed charges, {len(twice)} sent twice"))
    # outcome unknown: the worker died mid-call (DLQ reason), or an attempt reached the
    # provider and got no answer in time (the job status says so: it may apply it late)
    odd_dlq = [o for o in outs if o.outcome == "dead_lettered" and o.effect_applied
               and o.dlq_reason != "outcome_unknown" and o.told != "unknown"]
    acc.checks.append(("a dead-lettered job's effect happened only when its outcome is unknown",
                       not odd_dlq, f"{len(odd_dlq)} otherwise"))
    acc.checks.append(("every effect in the ledgers belongs to a job of the storm",
                       not acc.unexpected_effects,
                       ", ".join(f"{s}: {len(k)}" for s, k in acc.unexpected_effects.items())
                       or "none unexplained"))
    told_wrong = [o for o in outs if o.told == "not_attempted" and o.effect_applied]
    told = [o for o in outs if o.told]
    acc.checks.append(("no one told 'not charged' was charged (job status vs provider ledger)",
                       not told_wrong, f"{len(told)} told, {len(told_wrong)} wrongly"))
    disagree = [o for o in outs if (o.outcome == "served" and o.mark not in ("done", None))
                or (o.outcome == "dead_lettered" and o.mark not in ("dead", None))]
    acc.checks.append(("idempotency marks agree (done for served, dead for dead-lettered)",
                       not disagree, f"{len(disagree)} disagree"))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
