"""The report's PNG charts (matplotlib, Agg backend: no display needed).

* ``depth.png``: backlog (ready + in flight) per work queue over time, with the SQS deferral
  queue and the dead-letter total, under shaded bands for each fault;
* ``breakers.png``: each dependency's breaker state over time (closed / half-open / open);
* ``traffic.png``: the API's answers per second: queued, deferred, shed (503), rate limited (429);
* ``priorities.png``: where each priority's jobs ended.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tidegate.demo.accounting import PRIORITIES, Accounting
from tidegate.demo.policy import WATERMARKS, Timings
from tidegate.demo.storm import Sample, StormRecord

STATE_COLORS = {"closed": "#2e7d32", "half_open": "#f9a825", "open": "#c62828",
                "unknown": "#9e9e9e"}
QUEUE_COLORS = {"payments": "#6a1b9a", "search": "#1565c0", "email": "#ef6c00",
                "default": "#757575"}
OUTCOME_STYLE = [  # (outcome, label, colour)
    ("served", "served", "#2e7d32"),
    ("served_replayed", "served after a replay from SQS", "#81c784"),
    ("still_deferred", "still deferred (SQS)", "#ffb74d"),
    ("still_queued", "still queued", "#90caf9"),
    ("dead_lettered", "dead-lettered", "#6d4c41"),
    ("shed_503", "shed (503)", "#c62828"),
    ("rate_limited_429", "rate limited (429)", "#ef9a9a"),
    ("refused_other", "other refusal", "#9e9e9e"),
    ("unanswered", "no answer", "#424242"),
    ("missing", "MISSING", "#000000"),
]


def breaker_intervals(samples: list[Sample]) -> dict[str, list[tuple[str, float, float]]]:
    """dependency -> [(state, from_s, to_s)] from the sampled states."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for i, s in enumerate(samples):
        end = samples[i + 1].t if i + 1 < len(samples) else s.t + 0.5
        for dep, state in s.breakers.items():
            spans = out.setdefault(dep, [])
            if spans and spans[-1][0] == state and abs(spans[-1][2] - s.t) < 1.5:
                spans[-1] = (state, spans[-1][1], end)
            else:
                spans.append((state, s.t, end))
    return out


# Each phase its own colour and hatch, so overlapping phases stay apart (and in greyscale).
PHASE_STYLE = {"payments failing": ("#c62828", "////"), "email down": ("#ef6c00", "\\\\"),
               "scraper": ("#546e7a", "..")}
PHASE_LABEL = {"payments failing": "payments failing", "email down": "email down",
               "scraper": "scraper over its rate"}


def _span(record: StormRecord, name: str, scripted: tuple[float, float]) -> tuple[float, float]:
    """When the phase really ran (the script may run late), else when it was scripted."""
    seen = record.phase_spans.get(name, [])
    end = record.samples[-1].t if record.samples else record.duration
    return (seen[0], seen[1] if len(seen) > 1 else end) if seen else scripted


def _phase_bands(ax, record: StormRecord) -> None:
    p = record.phases
    scripted = {"payments failing": p.payments_failing, "email down": p.email_down,
                "scraper": p.scraper}
    for name, (color, hatch) in PHASE_STYLE.items():
        a, b = _span(record, name, scripted[name])
        ax.axvspan(a, b, facecolor=color, alpha=0.12, hatch=hatch, edgecolor=color, lw=0,
                   zorder=0, label=PHASE_LABEL[name])
    ax.axvline(record.killed_at if record.killed_at is not None else p.kill, color="black",
               ls=":", lw=1.2, label="payments worker SIGKILL")
    a, b = p.flood
    ax.axvline(a, color="#1565c0", ls="--", lw=0.8, alpha=0.6, label="flood starts / ends")
    ax.axvline(b, color="#1565c0", ls="--", lw=0.8, alpha=0.6)


def _finish(ax, record: StormRecord) -> None:
    end = record.samples[-1].t if record.samples else record.duration
    ax.set_xlim(0, max(end, record.duration))
    ax.grid(True, alpha=0.3)


def depth_chart(path: Path, record: StormRecord) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    t = [s.t for s in record.samples]
    for queue in ("search", "email", "payments"):
        backlog = [(s.queues[queue]["ready"] or 0) + (s.queues[queue]["in_flight"] or 0)
                   for s in record.samples]
        top.plot(t, backlog, color=QUEUE_COLORS[queue], lw=2, label=f"{queue} queue")
    deferred = [s.queues["email"]["deferred"] or 0 for s in record.samples]
    top.plot(t, deferred, color=QUEUE_COLORS["email"], lw=2, ls="--",
             label="email deferred in SQS")
    for queue in ("search", "email"):
        hi = WATERMARKS[queue][1]
        top.axhline(hi, color=QUEUE_COLORS[queue], lw=0.8, ls=(0, (1, 3)),
                    label=f"{queue} high watermark")
        top.annotate(f"{queue} high watermark ({hi})", (1.0, hi),
                     xycoords=("axes fraction", "data"), xytext=(-4, 3), ha="right",
                     textcoords="offset points", fontsize=8, color=QUEUE_COLORS[queue],
                     bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
    _phase_bands(top, record)
    top.set_ylabel("messages (ready + in flight)")
    top.set_title("Queue depth during the storm")
    top.legend(loc="upper right", fontsize=8, ncol=2, framealpha=0.9)
    _finish(top, record)
    for queue in ("payments", "search", "email"):
        dead = [s.queues[queue]["dead_letter"] or 0 for s in record.samples]
        if any(dead):
            bottom.step(t, dead, where="post", color=QUEUE_COLORS[queue], lw=2,
                        label=f"{queue}.dlq")
    _phase_bands(bottom, record)
    bottom.set_ylabel("dead letters")
    bottom.set_xlabel("seconds since the storm started")
    dlq = [(h, lbl) for h, lbl in zip(*bottom.get_legend_handles_labels(), strict=True)
           if lbl.endswith(".dlq")]  # the phases are in the legend above
    if dlq:
        bottom.legend(*zip(*dlq, strict=True), loc="upper left", fontsize=8)
    _finish(bottom, record)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def breaker_chart(path: Path, record: StormRecord, timings: Timings) -> Path:
    spans = breaker_intervals(record.samples)
    deps = [d for d in ("payments", "pricing", "search", "email") if d in spans]
    fig, ax = plt.subplots(figsize=(12, 1.1 + 0.7 * len(deps)))
    for row, dep in enumerate(deps):
        for state, a, b in spans[dep]:
            ax.barh(row, b - a, left=a, height=0.6, color=STATE_COLORS.get(state, "#9e9e9e"),
                    edgecolor="none", zorder=3)
    ax.set_yticks(range(len(deps)), deps)
    ax.invert_yaxis()
    _phase_bands(ax, record)
    phases, names = ax.get_legend_handles_labels()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLORS.values()]
    ax.legend([*handles, *phases], [*(s.replace("_", "-") for s in STATE_COLORS), *names],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(deps) < 4 else -0.25),
              ncol=5, fontsize=8, frameon=False)
    ax.set_title(f"Circuit breakers (open {timings.open_s:g}s, then one half-open trial)")
    ax.set_xlabel("seconds since the storm started")
    _finish(ax, record)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def traffic_chart(path: Path, record: StormRecord) -> Path:
    start = record.started_at
    end = int(max(record.duration, 1)) + 1
    kinds = [("queued", "#2e7d32", "202 queued"), ("deferred", "#ffb74d", "202 deferred to SQS"),
             ("503", "#c62828", "503 shed"), ("429", "#ef9a9a", "429 rate limited"),
             ("other", "#616161", "other / no answer")]
    per: dict[str, Counter] = {k: Counter() for k, _, _ in kinds}
    for job in record.jobs:
        second = int(job.sent_at - start)
        if job.status == 202:
            kind = "deferred" if job.state == "deferred" else "queued"
        elif job.status in (503, 429):
            kind = str(job.status)
        else:
            kind = "other"
        per[kind][second] += 1
    xs = list(range(end))
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.stackplot(xs, *[[per[k][x] for x in xs] for k, _, _ in kinds],
                 colors=[c for _, c, _ in kinds], labels=[lbl for _, _, lbl in kinds],
                 step="post", zorder=2)
    _phase_bands(ax, record)
    ax.set_ylabel("requests per second")
    ax.set_xlabel("seconds since the storm started")
    ax.set_title("What the HTTP API answered, per second")
    ax.legend(loc="upper right", fontsize=8, ncol=5, framealpha=0.9)
    _finish(ax, record)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def priority_chart(path: Path, acc: Accounting) -> Path:
    table = acc.table()
    for o in acc.outcomes:  # show what went through SQS apart from what was served directly
        if o.outcome == "served" and o.deferred_by:
            table[o.job.priority]["served"] -= 1
            table[o.job.priority]["served_replayed"] += 1
    fig, ax = plt.subplots(figsize=(12, 4.2))
    labels = [p.upper() for p in PRIORITIES]
    left = [0] * len(PRIORITIES)
    for outcome, label, color in OUTCOME_STYLE:
        widths = [table[p][outcome] for p in PRIORITIES]
        if not any(widths):
            continue
        ax.barh(labels, widths, left=left, color=color, label=label)
        for i, w in enumerate(widths):
            if w and w >= 0.04 * max(1, max(sum(table[p].values()) for p in PRIORITIES)):
                ax.text(left[i] + w / 2, i, str(w), ha="center", va="center", fontsize=8,
                        color="black" if outcome in ("rate_limited_429", "served_replayed",
                                                     "still_deferred") else "white")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("jobs sent through the API")
    ax.set_title("Where each priority's jobs ended")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=4,
              frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out: Path, record: StormRecord, acc: Accounting, timings: Timings) -> list[Path]:
    return [depth_chart(out / "depth.png", record),
            breaker_chart(out / "breakers.png", record, timings),
            traffic_chart(out / "traffic.png", record),
            priority_chart(out / "priorities.png", acc)]
