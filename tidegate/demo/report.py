"""``report.md``: what the storm did to the pipeline, in plain words and tables."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tidegate.demo.accounting import PRIORITIES, Accounting, Records, percentile
from tidegate.demo.charts import breaker_intervals
from tidegate.demo.policy import WATERMARKS, Timings
from tidegate.demo.stack import CLIENT_BURST, CLIENT_RATE_PER_S, CLIENTS, LATENCY_MS, WORKERS
from tidegate.demo.storm import KEY_PREFIX, STREAMS, StormRecord


def _rate(record: StormRecord, window: tuple[float, float], keep: Any) -> float:
    a, b = window
    n = sum(1 for j in record.jobs if a <= j.sent_at - record.started_at < b and keep(j))
    return n / max(1e-9, b - a)


def _capacity_lines(record: StormRecord, acc: Accounting) -> list[str]:
    a, b = record.phases.flood
    lines = ["| queue | workers | offered during the flood | served during the flood | "
             "offered / served |", "|---|---|---:|---:|---:|"]
    start = record.started_at
    for queue, task in (("search", "search.index"), ("email", "email.send"),
                        ("payments", "payments.charge")):
        offered = _rate(record, (a, b), lambda j, t=task: j.task == t)
        done = sum(1 for o in acc.outcomes if o.job.task == task and o.seconds_to_effect
                   is not None and a <= o.job.sent_at + o.seconds_to_effect - start < b)
        served = done / max(1e-9, b - a)
        ratio = f"{offered / served:.1f}x" if served else "-"
        lines.append(f"| {queue} | {WORKERS[queue]} threads, downstream "
                     f"{LATENCY_MS[queue]} ms | {offered:.1f} jobs/s | {served:.1f} jobs/s | "
                     f"{ratio} |")
    return lines


def _priority_table(acc: Accounting) -> list[str]:
    table = acc.table()
    lines = ["| priority | requests | served | of which replayed from SQS | shed (503) | "
             "rate limited (429) | dead-lettered | still deferred | other | "
             "seconds to effect p50 / p95 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in PRIORITIES:
        outs = [o for o in acc.outcomes if o.job.priority == p]
        if not outs:
            continue
        c = table[p]
        replayed = sum(1 for o in outs if o.outcome == "served" and o.deferred_by)
        waits = [o.seconds_to_effect for o in outs if o.outcome == "served"
                 and o.seconds_to_effect is not None]
        p50, p95 = percentile(waits, 50), percentile(waits, 95)
        lat = f"{p50:.2f} / {p95:.2f}" if p50 is not None and p95 is not None else "-"
        other = c["still_queued"] + c["refused_other"] + c["unanswered"] + c["missing"]
        lines.append(f"| {p.upper()} | {len(outs)} | {c['served']} | {replayed} | "
                     f"{c['shed_503']} | {c['rate_limited_429']} | {c['dead_lettered']} | "
                     f"{c['still_deferred']} | {other} | {lat} |")
    return lines


def _breaker_lines(record: StormRecord) -> list[str]:
    lines = []
    for dep, spans in breaker_intervals(record.samples).items():
        opened = [(a, b) for state, a, b in spans if state == "open"]
        if not opened:
            lines.append(f"- **{dep}**: stayed closed.")
            continue
        parts = []
        for i, (state, a, b) in enumerate(spans):
            if state == "closed" and i == 0:
                continue
            parts.append(f"{state.replace('_', '-')} {a:.1f}s-{b:.1f}s")
        lines.append(f"- **{dep}**: opened {len(opened)} time(s); " + ", ".join(parts) + ".")
    return lines


def _dlq_lines(acc: Accounting, records: Records) -> list[str]:
    lines = []
    for queue, items in records.dead_letters.items():
        if not items:
            continue
        reasons = Counter(r.reason for r in items)
        lines.append(f"- **{queue}.dlq**: {len(items)} record(s)")
        for reason, n in reasons.most_common():
            example = next(r for r in items if r.reason == reason)
            msg = (example.exception_message or "").splitlines()[0][:140] if \
                example.exception_message else ""
            lines.append(f"  - `{reason}` x {n} — e.g. {example.task} "
                         f"(attempts {example.attempts}): {msg}")
    if not lines:
        lines.append("- none")
    applied = [o for o in acc.outcomes if o.outcome == "dead_lettered" and o.effect_applied]
    died = sum(1 for o in applied if o.dlq_reason == "outcome_unknown")
    if died:
        lines.append(f"- {died} `outcome_unknown` record(s) belong to charges whose effect "
                     "the provider's ledger shows applied: the worker died after the call and "
                     "before recording it, and Tidegate did not charge again.")
    if len(applied) > died:
        lines.append(f"- {len(applied) - died} other dead-lettered charge(s) are in the "
                     "provider's ledger: an attempt reached the provider and got no answer in "
                     "time (it applied the charge late), so their job status says the outcome "
                     "is unknown, never \"not charged\"; none was charged again.")
    lines.extend(_told_lines(acc))
    lines.append("- Each record carries task, arguments, headers, idempotency key, exception "
                 "and traceback: `tidegate dlq list QUEUE --json`, `tidegate dlq replay QUEUE "
                 "--id ID` (a charge without an idempotency key needs `--force`).")
    return lines


def _told_lines(acc: Accounting) -> list[str]:
    """What the job status of each failed charge tells its user (payments' graceful fallback):
    "not charged" only where no attempt reached the provider, checked against its ledger."""
    told = [o for o in acc.outcomes if o.told]
    if not told:
        return []
    lines = [f"- What `GET /v1/jobs/{{id}}` tells the user of each of the {len(told)} failed "
             "charge(s) (payments' graceful fallback; the same in `tidegate job ID`):"]
    for outcome, meaning in (("not_attempted", "no attempt reached the provider"),
                             ("unknown", "an attempt reached it, or may have")):
        group = [o for o in told if o.told == outcome]
        if group:
            charged = sum(1 for o in group if o.effect_applied)
            lines.append(f"  - `{outcome}` x {len(group)} ({meaning}; the provider's ledger "
                         f"shows {charged} of them charged): \"{group[0].told_message}\"")
    return lines


def _deferral_lines(acc: Accounting, records: Records,
                    stats: dict[str, Any] | None) -> list[str]:
    email = [o for o in acc.outcomes if o.job.task == "email.send"]
    by_api = sum(1 for o in email if o.deferred_by == "api")
    by_worker = sum(1 for o in email if o.deferred_by == "worker")
    replayed = sum(1 for o in email if o.deferred_by and o.outcome == "served")
    left = [o for o in email if o.outcome == "still_deferred"]
    lines = [
        f"- **{by_api + by_worker}** email jobs went to the SQS deferral queue: {by_api} at the "
        f"API (202 `deferred`: the email breaker was open) and {by_worker} by a worker (refused "
        "by the open breaker, or failing on its last attempt).",
        f"- **{replayed}** of them were replayed by `tidegate replayer` once email was back and "
        "sent exactly once (email ledger, by idempotency key).",
        f"- still in SQS at the end: **{len(left)}**"
        + (": " + ", ".join(o.job.key or "?" for o in left[:20]) if left else "."),
    ]
    if stats:
        lines.append(f"- the replayer's own tally: received {stats.get('received')}, published "
                     f"{stats.get('published')}, deleted {stats.get('deleted')}, poison "
                     f"{stats.get('poison')}.")
    return lines


def _depth_lines(record: StormRecord) -> list[str]:
    """Each queue's peak of ready messages against its high watermark, and when above it, what
    the API admitted into the queue in the two seconds before the peak."""
    lines = []
    for queue in WORKERS:
        high = WATERMARKS[queue][1]
        seen = [(s.t, s.queues[queue]["ready"]) for s in record.samples
                if queue in s.queues and s.queues[queue].get("ready") is not None]
        if not seen:
            continue
        peak_t, peak = max(seen, key=lambda item: item[1])
        above = sum(1 for _, ready in seen if ready > high)
        if not above:
            lines.append(f"- **{queue}**: peak {peak} ready at {peak_t:.1f}s, under its high "
                         f"watermark ({high}).")
            continue
        admitted = Counter(j.priority.upper() for j in record.jobs
                           if j.status == 202 and j.queue == queue and j.answered_at
                           and peak_t - 2 <= j.answered_at - record.started_at <= peak_t)
        lines.append(
            f"- **{queue}**: peak {peak} ready at {peak_t:.1f}s, above its high watermark "
            f"({high}) in {above} of {len(seen)} samples (~{above * 0.5:.1f}s). Admitted into "
            f"it in the 2 s before the peak: "
            + (", ".join(f"{n} {p}" for p, n in admitted.most_common()) or "nothing") + ".")
    if any("above its high" in line for line in lines):
        lines += ["", "Why a queue can pass its high watermark: above it only CRITICAL is "
                  "admitted (never shed); the API decides from a depth reading refreshed every "
                  "50 ms, so what it admits within one reading lands on top; and what enters "
                  "without the API does not ask: held retries coming due, a killed worker's "
                  "tasks brought back, replays from SQS (the replayer waits for its own "
                  "watermark)."]
    return lines


def latency_by_status(record: StormRecord) -> dict[str, dict[str, float]]:
    """The API's answer time per status code, from the client's own clock (request sent to
    answer read): count, p50, p99 and max in milliseconds."""
    times: dict[str, list[float]] = defaultdict(list)
    for j in record.jobs:
        if j.answered_at is None:
            continue
        label = f"{j.status} {j.state}" if j.status == 202 else str(j.status or "no answer")
        times[label].append((j.answered_at - j.sent_at) * 1000)
    return {label: {"count": len(v), "p50": percentile(v, 50) or 0.0,
                    "p99": percentile(v, 99) or 0.0, "max": max(v)}
            for label, v in sorted(times.items())}


def _latency_lines(record: StormRecord) -> list[str]:
    lines = ["Time from sending a request to reading the API's answer, on the flood's own "
             "clock (so it includes the client's share of a busy machine).", "",
             "| answer | requests | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for label, row in latency_by_status(record).items():
        lines.append(f"| {label} | {row['count']:.0f} | {row['p50']:.0f} | {row['p99']:.0f} | "
                     f"{row['max']:.0f} |")
    return lines


def _kill_lines(record: StormRecord, acc: Accounting, timings: Timings) -> list[str]:
    at = record.killed_at if record.killed_at is not None else record.phases.kill
    provider = {f"key:{k}" if k.startswith(KEY_PREFIX) else f"task:{k}"
                for k in record.killed_at_provider}
    marks = list(dict.fromkeys([*record.killed_in_flight, *sorted(provider)]))
    if not marks:
        return [f"- the payments worker was SIGKILLed at {at:.1f}s; no charge was seen in "
                "progress at that instant."]
    lines = [f"- SIGKILL at {at:.1f}s with {len(record.killed_at_provider)} charge(s) in "
             "progress at the provider (its ledger) and "
             f"{len(record.killed_in_flight)} delivery(ies) held by the worker (idempotency "
             "marks `started`). What the killed worker held comes back to another worker "
             "(the orphan sweep, or the visibility timeout of "
             f"{timings.visibility_timeout_s}s). Each one's fate:"]
    by_mark = {}
    for o in acc.outcomes:
        if o.job.task == "payments.charge":
            by_mark[f"key:{o.job.key}" if o.job.key else f"task:{o.job.id}"] = o
    for m in marks:
        o = by_mark.get(m)
        if o is None:
            lines.append(f"  - `{m}`: not a job of this storm")
            continue
        applied = "applied once" if o.effect_applied else "not applied"
        if o.outcome == "dead_lettered":
            fate = (f"not run again: dead-lettered as `{o.dlq_reason}`; the provider's ledger: "
                    f"{applied}")
        elif o.job.key and o.attempts_downstream > 1:
            fate = f"redelivered and run again with its key; the provider's ledger: {applied}"
        elif o.outcome == "served":
            fate = ("it finished in the milliseconds between the check and the signal "
                    f"(acked, mark done); {applied}")
        else:
            fate = f"{o.outcome}: {o.evidence}"
        kind = "keyed" if o.job.key else "unkeyed, not idempotent"
        where = ", at the provider" if m in provider else ""
        lines.append(f"  - `{m}` ({kind}{where}): {fate}")
    return lines


def render(record: StormRecord, acc: Accounting, records: Records,
           stats: dict[str, Any] | None, timings: Timings, images: list[Path]) -> str:
    c = acc.by_outcome
    total = len(acc.outcomes)
    when = dt.datetime.fromtimestamp(record.started_at).strftime("%Y-%m-%d %H:%M:%S")
    verdict = ("NOTHING LOST" if acc.ok else f"{c['missing']} JOB(S) LOST" if c["missing"]
               else "CHECK FAILED")
    eq = (f"{total} jobs in = {c['served']} served + {c['shed_503']} shed (503) + "
          f"{c['rate_limited_429']} rate limited (429) + {c['dead_lettered']} dead-lettered + "
          f"{c['still_deferred']} still deferred")
    extra = c["still_queued"] + c["refused_other"] + c["unanswered"] + c["missing"]
    if extra:
        eq += (f" + {c['still_queued']} still queued + {c['refused_other']} other refusals + "
               f"{c['unanswered']} unanswered + {c['missing']} MISSING")
    drained = (f"drained {record.drained_at - record.duration:.0f}s after the storm"
               if record.drained_at else f"NOT drained within {record.drain_timeout:.0f}s")
    lines = [
        f"# Tidegate storm demo — {verdict}", "",
        f"{when}: a {record.duration:.0f}-second storm against the real pipeline "
        f"(`tidegate demo --duration {record.duration:g}`), {drained}.", "",
        f"**{eq}.**", "",
        "Every figure below is read per job from the system's own records — the simulators' "
        "ledgers (by idempotency key), the dead-letter queues, the SQS deferral queue, the "
        "idempotency marks in Redis, the workers' logs — and from the API's answer to each "
        "request. Nothing is counted by the demo itself.", "",
        "## Served per priority", "", *_priority_table(acc), "",
        "Shedding follows the seed: LOW first, then MEDIUM, then HIGH; CRITICAL never. "
        "Seconds to effect: from the request to the effect in the downstream's ledger. The "
        "slow tails are work that waited instead of being dropped: charges held (retried "
        "later) while the payments circuit was open, email waiting in SQS for the replay, "
        "LOW behind HIGH on the search queue.", "",
        "## The flood", "",
        f"Watermarks (ready messages): search {WATERMARKS['search']}, email "
        f"{WATERMARKS['email']}. Rate limit {CLIENT_RATE_PER_S} requests/s per client token "
        f"(burst {CLIENT_BURST}); each client spreads its traffic over "
        + ", ".join(f"{c} {n}" for c, n in CLIENTS.items()) + " token(s).",
        "",
        *_capacity_lines(record, acc), "",
        "Depth against the high watermark (ready messages, sampled every 0.5 s):", "",
        *_depth_lines(record), "",
        "Streams: " + "; ".join(
            f"{s.name} ({s.client}, {s.priority.upper()} {s.task}) "
            + (f"{s.flood_rate:g}/s from {s.window[0]:.0%} of the storm until it was refused "
               f"({s.window[1]:.0%} at the earliest)"
               if s.window else f"{s.normal_rate:g}/s, {s.flood_rate:g}/s in the flood")
            for s in STREAMS) + ".", "",
        "## Shed (503) and rate limited (429)", "",
        *_refusal_lines(acc), "",
        "## API answer time per status", "",
        *_latency_lines(record), "",
        "## Circuit breakers", "",
        f"Open when more than 50% of the calls in {timings.window_s:g}s fail (at least 10 "
        f"calls); open {timings.open_s:g}s; then one half-open trial. From the shared breaker "
        "state in Redis, sampled every 0.5 s.", "",
        *_breaker_lines(record), "",
        "## Queue for later (SQS) and replay", "", *_deferral_lines(acc, records, stats), "",
        "## Dead-letter queues", "", *_dlq_lines(acc, records), "",
        "## Worker killed mid-task", "", *_kill_lines(record, acc, timings), "",
        "## The proof", "", f"`{eq}`", "",
        *_exception_lines(acc),
        "| check | result | |", "|---|---|---|",
        *[f"| {name} | {'pass' if ok else '**FAIL**'} | {detail} |"
          for name, ok, detail in acc.checks], "",
        "## Timeline", "",
        *[f"- {t:6.1f}s  {text}" for t, text in record.events], "",
        "## Charts", "",
        *[f"![{p.stem}]({p.name})" for p in images], "",
        "Logs of every process: `logs/`; the policy file the run used: `policy.toml`; "
        "every job and its outcome: `jobs.jsonl`.", "",
    ]
    return "\n".join(lines)


def _exception_lines(acc: Accounting) -> list[str]:
    """Every job that is not simply served, refused, dead-lettered or deferred, one by one."""
    odd = [o for o in acc.outcomes if o.outcome in ("missing", "unanswered", "refused_other",
                                                    "still_deferred", "still_queued")]
    if not odd:
        return []
    lines = ["Listed one by one:", ""]
    for o in odd[:200]:
        j = o.job
        lines.append(f"- **{o.outcome}** {j.stream} {j.task} key={j.key} id={j.id} "
                     f"answer={j.status} {j.state or ''} mark={o.mark}: {o.evidence}")
    return [*lines, ""]


def _refusal_lines(acc: Accounting) -> list[str]:
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for o in acc.outcomes:
        if o.outcome in ("shed_503", "rate_limited_429"):
            by[(o.outcome, o.job.stream)].append(o.job.retry_after or 0.0)
    if not by:
        return ["- nothing was refused."]
    lines = []
    for (outcome, stream), ras in sorted(by.items()):
        code = "503" if outcome == "shed_503" else "429"
        lines.append(f"- {code} to **{stream}**: {len(ras)} requests, Retry-After "
                     f"{min(ras):g}-{max(ras):g}s")
    return lines


def jobs_jsonl(acc: Accounting) -> str:
    import json

    rows = []
    for o in acc.outcomes:
        j = o.job
        rows.append(json.dumps({
            "stream": j.stream, "task": j.task, "priority": j.priority, "key": j.key,
            "id": j.id, "status": j.status, "state": j.state, "outcome": o.outcome,
            "sent_at": j.sent_at, "answered_at": j.answered_at,
            "evidence": o.evidence, "deferred_by": o.deferred_by, "replayed": o.replayed,
            "dlq_reason": o.dlq_reason, "effect_applied": o.effect_applied,
            "mark": o.mark, "seconds_to_effect": o.seconds_to_effect}))
    return "\n".join(rows) + "\n"


def write(out: Path, record: StormRecord, acc: Accounting, records: Records,
          stats: dict[str, Any] | None, timings: Timings, images: list[Path]) -> Path:
    (out / "jobs.jsonl").write_text(jobs_jsonl(acc))
    path = out / "report.md"
    path.write_text(render(record, acc, records, stats, timings, images))
    return path
