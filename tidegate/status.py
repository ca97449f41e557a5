"""The status page: per queue and per dependency over the last minutes, on a time axis.

Per queue: depth (ready) and retries waiting (the broker's delayed messages and the countdowns
workers hold), in flight against capacity (the live workers' pool sizes summed), dead letters,
deferred, desired vs running workers, and producer sheds / rate-limited per second. Per dependency:
throughput, successes, failures, retries, fallbacks, rate-limited and deferred per second
(cluster counters every worker mirrors to Redis), and the breaker's state history.

Served by the exporter (same process, same snapshots). The page is static HTML + one script
+ one stylesheet from ``tidegate/static`` (no build step, nothing fetched from outside); it
polls ``/api/status`` and draws the charts as SVG. It is meant for a wall screen: an open
breaker turns its tile and a banner red, a shed storm (sheds above ``storm_per_s`` over the
last ``storm_window_s``, workers' sheds plus producers' backpressure refusals) turns the banner
amber, both readable from across the room.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from tidegate.snapshot import Observer, Snapshot

__all__ = ["History", "create_app"]

STATIC = Path(__file__).with_name("static")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _total(snap: Snapshot, family: str, **match: str) -> float:
    return sum(v for labels, v in snap.counters.get(family, [])
               if all(labels.get(k) == want for k, want in match.items()))


class History:
    """The last ``max_age_s`` of snapshots, oldest first (bounded in time and in count)."""

    def __init__(self, max_age_s: float = 600.0, max_points: int = 3600) -> None:
        self.max_age_s = max_age_s
        self._items: deque[Snapshot] = deque(maxlen=max_points)
        self._lock = threading.Lock()

    def add(self, snap: Snapshot) -> None:
        with self._lock:
            if self._items and self._items[-1].taken_at >= snap.taken_at:
                return  # the same cached snapshot twice
            self._items.append(snap)
            while self._items and self._items[0].taken_at < snap.taken_at - self.max_age_s:
                self._items.popleft()

    def items(self) -> list[Snapshot]:
        with self._lock:
            return list(self._items)

    def rate(self, window_s: float, family: str, **match: str) -> float:
        """Per-second increase of a cluster counter over the last ``window_s``."""
        items = self.items()
        if len(items) < 2:
            return 0.0
        last = items[-1]
        first = next((s for s in items if s.taken_at >= last.taken_at - window_s), items[0])
        if last.taken_at <= first.taken_at:
            return 0.0
        delta = _total(last, family, **match) - _total(first, family, **match)
        return max(0.0, delta) / (last.taken_at - first.taken_at)


# Per-second rates drawn per dependency: series name -> (cluster family, label matches; any
# one of several matches counts). Every one also matches dependency=<the dependency>.
DEPENDENCY_RATES: dict[str, tuple[str, tuple[dict[str, str], ...]]] = {
    "throughput": ("tidegate_cluster_calls", ({},)),
    "successes": ("tidegate_cluster_calls", ({"outcome": "success"},)),
    "failures": ("tidegate_cluster_calls", ({"outcome": "failure"}, {"outcome": "timeout"})),
    "retries": ("tidegate_cluster_retries", ({},)),
    "fallbacks": ("tidegate_cluster_fallbacks", ({},)),
    "rate_limited": ("tidegate_cluster_rejections", ({"reason": "rate_limited"},)),
    "deferred": ("tidegate_cluster_deferrals", ({"result": "stored"},)),
}
# ... and per queue (matching queue=<the queue>)
QUEUE_RATES: dict[str, tuple[str, tuple[dict[str, str], ...]]] = {
    "dead_letters": ("tidegate_cluster_dead_letters", ({},)),
    "sheds": ("tidegate_cluster_producer_refused", ({"reason": "backpressure"},
                                                    {"reason": "shed"})),
    "rate_limited": ("tidegate_cluster_producer_refused", ({"reason": "rate_limited"},)),
}


def _sum(snap: Snapshot, family: str, matches: tuple[dict[str, str], ...], **fixed: str
         ) -> float:
    return sum(_total(snap, family, **fixed, **m) for m in matches)


def _rates(items: list[Snapshot], family: str, matches: tuple[dict[str, str], ...],
           **fixed: str) -> list[float | None]:
    """Per-second increase between consecutive snapshots (None for the first)."""
    totals = [_sum(item, family, matches, **fixed) for item in items]
    out: list[float | None] = [None] if items else []
    for i in range(1, len(items)):
        dt = items[i].taken_at - items[i - 1].taken_at
        out.append(round(max(0.0, totals[i] - totals[i - 1]) / dt, 3) if dt > 0 else None)
    return out


def _queue_figure(view: Any, field: str) -> int | None:
    """One queue's figure as the page draws it: in flight is what the workers are running
    (retries they hold until a countdown ends are not: those count as retries waiting, with
    the broker's delayed messages), desired is the autoscaler's desired workers."""
    if field == "in_flight":
        return None if view.in_flight is None else view.in_flight - (view.held_retries or 0)
    if field == "delayed":
        if view.delayed is None and view.held_retries is None:
            return None
        return (view.delayed or 0) + (view.held_retries or 0)
    return getattr(view, "desired_workers" if field == "desired" else field)


def status_document(observer: Observer, history: History, *, storm_per_s: float,
                    storm_window_s: float) -> dict[str, Any]:
    snap = observer.snapshot()
    history.add(snap)
    items = history.items()
    series: dict[str, dict[str, list]] = {}
    fields = ("ready", "in_flight", "delayed", "capacity", "dead_letter", "deferred",
              "desired", "live_workers")
    for q in snap.queues:
        series[q.name] = {f: [] for f in fields}
    times = []
    breaker_history: dict[str, list[str | None]] = {b.dependency: [] for b in snap.breakers}
    for item in items:
        times.append(round(item.taken_at, 3))
        by_name = {q.name: q for q in item.queues}
        for name, s in series.items():
            view = by_name.get(name)
            for f in fields:
                s[f].append(_queue_figure(view, f) if view else None)
        states = {b.dependency: b.state for b in item.breakers}
        for dep, states_seen in breaker_history.items():
            states_seen.append(states.get(dep))
    for name, s in series.items():
        for key, (family, matches) in QUEUE_RATES.items():
            s[f"{key}_per_s"] = _rates(items, family, matches, queue=name)
    dependencies = {
        dep: {"queue": next((b.queue for b in snap.breakers if b.dependency == dep), None),
              "breaker": states_seen,
              **{f"{key}_per_s": _rates(items, family, matches, dependency=dep)
                 for key, (family, matches) in DEPENDENCY_RATES.items()}}
        for dep, states_seen in breaker_history.items()}
    sheds_all = _rates(items, "tidegate_cluster_sheds", ({},))
    refused = "tidegate_cluster_producer_refused"
    sheds = (history.rate(storm_window_s, "tidegate_cluster_sheds")
             + history.rate(storm_window_s, refused, reason="backpressure"))
    rate_limited = (history.rate(storm_window_s, "tidegate_cluster_rejections",
                                 reason="rate_limited")
                    + history.rate(storm_window_s, refused, reason="rate_limited"))
    doc = snap.to_dict()
    outcomes: dict[str, dict[str, float]] = {q.name: {} for q in snap.queues}
    for labels, value in snap.counters.get("tidegate_cluster_task_outcomes", []):
        per_queue = outcomes.setdefault(labels.get("queue", ""), {})
        per_queue[labels.get("outcome", "")] = value
    doc.update({
        # the exporter's tidegate_cluster_task_outcomes_total: what Flower shows per task
        "outcomes": outcomes,
        "history": {"t": times, "queues": series, "dependencies": dependencies,
                    "sheds_per_s": sheds_all, "window_s": history.max_age_s},
        "sheds_per_s": round(sheds, 3),
        "rate_limited_per_s": round(rate_limited, 3),
        "shed_storm": sheds >= storm_per_s,
        "storm_per_s": storm_per_s,
    })
    return doc


def create_app(observer: Observer, history: History, registry: Any, *,
               storm_per_s: float = 1.0, storm_window_s: float = 10.0) -> FastAPI:
    """The exporter's HTTP app: /metrics, /, /api/status, /healthz, /static."""
    from tidegate.exporter import render

    app = FastAPI(title="Tidegate status", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(registry), media_type=METRICS_CONTENT_TYPE)

    @app.get("/api/status")
    def status() -> JSONResponse:
        return JSONResponse(status_document(observer, history, storm_per_s=storm_per_s,
                                            storm_window_s=storm_window_s),
                            headers={"Cache-Control": "no-store"})

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "status.html", headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
