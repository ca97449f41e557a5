"""The storm: a scripted flood through the HTTP API while dependencies fail and a worker dies.

Phases are fractions of the storm's duration, so ``--duration 30`` is the same story told
faster (the policy's breaker and retry timings shrink with it, see ``policy.Timings``)::

    0 ......... warm-up at a normal rate (everything served)
    8% ........ flood: several times what the workers can do, mixed priorities
    12% - 33% . payments downstream failing (503s): its breaker opens, then heals
    20% - 45% . one client (the "scraper") far over its rate limit: 429s
    25% - 50% . email downstream down: email jobs queued for later in SQS, replayed after
    55% ....... the payments worker SIGKILLed mid-task, restarted a moment later
    83% - 100%  back to the normal rate; then the drain: wait until every queue is empty

A phase does not end before its effect was seen (payments: the breaker open; email: also
something deferred to SQS; the scraper: a 429), for two breaker windows at most: on a busy
machine the script and the flood run late, and a phase squeezed shorter than the breaker's
window opens nothing, a scraper slowed under its rate limit is never refused.

Every request the flood makes is recorded with the answer the API gave (202 queued or
deferred, 503, 429 ...); the sampler records depths, dead letters, deferred counts and breaker
states every half second. Nothing here counts outcomes: ``accounting`` does that from the
system's records afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tidegate.demo.stack import CLIENTS, LATENCY_MS, DemoStack
from tidegate.stack import wait_until

SAMPLE_INTERVAL_S = 0.5
KEY_PREFIX = "demo-"  # every idempotency key the flood sends; an unkeyed charge goes by task id
# The payments provider's latency around the kill: long enough for the signal to land during a
# charge, inside the policy's 80 ms attempt timeout.
KILL_LATENCY_MS = 50
# Each stream has its own bound on open requests, so a slow stream cannot starve another.


@dataclass(frozen=True)
class Stream:
    """One kind of traffic: a client (bearer token) sending one task at one priority."""

    name: str
    client: str
    task: str
    priority: str
    normal_rate: float  # jobs/s outside the flood
    flood_rate: float  # jobs/s during the flood
    keyed: float = 1.0  # share of jobs that carry an idempotency key
    window: tuple[float, float] | None = None  # switched on by the script (Phases), else off
    in_flight: int = 40  # concurrent requests at most (an abusive client opens more)

    def rate(self, flood: bool, on: bool) -> float:
        if self.window is not None:
            return self.flood_rate if on else 0.0
        return self.flood_rate if flood else self.normal_rate

    def job(self, n: int, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {"task": self.task, "priority": self.priority}
        if self.task == "payments.charge":
            body["args"] = [f"acct-{n % 97}", 500 + (n * 37) % 9000]
        elif self.task == "email.send":
            body["args"] = [f"user{n}@example.test", f"order update {n}"]
        else:
            body["args"] = [f"{self.name}-doc-{n}"]
            body["kwargs"] = {"body": {"title": f"document {n}", "from": self.name}}
        if rng.random() < self.keyed:
            body["idempotency_key"] = f"{KEY_PREFIX}{self.name}-{n:06d}"
        return body


STREAMS = (
    Stream("payments", "checkout", "payments.charge", "critical", 3, 6, keyed=0.5),
    Stream("search", "web", "search.index", "high", 5, 15),
    Stream("analytics", "indexer", "search.index", "low", 3, 20),
    Stream("email", "notifier", "email.send", "medium", 3, 12),
    Stream("scraper", "scraper", "search.index", "low", 0, 40, window=(0.20, 0.45),
           in_flight=100),
)


@dataclass(frozen=True)
class Phases:
    """When things happen, in seconds from the start of the storm."""

    duration: float

    def at(self, frac: float) -> float:
        return self.duration * frac

    @property
    def flood(self) -> tuple[float, float]:
        return self.at(0.08), self.at(0.83)

    @property
    def payments_failing(self) -> tuple[float, float]:
        return self.at(0.12), self.at(0.33)

    @property
    def email_down(self) -> tuple[float, float]:
        return self.at(0.25), self.at(0.50)

    @property
    def scraper(self) -> tuple[float, float]:
        return self.at(0.20), self.at(0.45)

    @property
    def kill(self) -> float:
        return self.at(0.55)

    @property
    def restart_after(self) -> float:
        return max(2.0, self.at(0.03))


@dataclass
class Job:
    """One request of the flood and the API's answer to it."""

    n: int
    stream: str
    client: str
    task: str
    priority: str
    key: str | None
    sent_at: float  # epoch seconds
    status: int | None = None  # None: no answer (transport error)
    state: str | None = None  # queued / deferred for a 202
    id: str | None = None  # task id (queued) or SQS message id (deferred)
    queue: str | None = None
    retry_after: float | None = None
    error: str | None = None
    answered_at: float | None = None


@dataclass
class Sample:
    t: float  # seconds since the storm started
    queues: dict[str, dict[str, Any]]
    breakers: dict[str, str]
    errors: tuple[str, ...] = ()  # what could not be read (such a sample is never "idle")


@dataclass
class StormRecord:
    """What the storm did and saw: inputs for accounting, report and charts."""

    started_at: float  # epoch
    duration: float
    phases: Phases
    jobs: list[Job] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    killed_in_flight: list[str] = field(default_factory=list)  # marks "started" at the kill
    killed_at_provider: list[str] = field(default_factory=list)  # ledger keys in progress
    killed_at: float | None = None  # seconds after the start
    # When each phase really began and ended (seconds; the script may run late): for the charts
    phase_spans: dict[str, list[float]] = field(default_factory=dict)
    drained_at: float | None = None  # seconds after the start; None: drain timed out
    drain_timeout: float = 0.0

    def event(self, text: str) -> None:
        self.events.append((round(time.time() - self.started_at, 2), text))

    def phase(self, name: str) -> None:
        """Mark the start (first call) or the end (second call) of a phase, now."""
        self.phase_spans.setdefault(name, []).append(round(time.time() - self.started_at, 2))


class Flood:
    """Open-loop arrivals per stream (asyncio, own thread), each with its own bound on open
    requests."""

    def __init__(self, stack: DemoStack, record: StormRecord, seed: int = 7) -> None:
        self.stack = stack
        self.record = record
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="flood",
                                       daemon=True)
        self.counter = 0
        self.active: set[str] = set()  # windowed streams the script has switched on

    def flooding(self, t: float) -> bool:
        a, b = self.record.phases.flood
        return a <= t < b

    async def _main(self) -> None:
        total = sum(s.in_flight for s in STREAMS)
        # Idle connections are dropped well before uvicorn's 5 s keep-alive ends, so a request
        # is not sent on a connection the server is closing.
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total,
                              keepalive_expiry=2.0)
        async with httpx.AsyncClient(base_url=self.stack.api_url, limits=limits,
                                     timeout=httpx.Timeout(20.0, connect=5.0)) as http:
            pending: set[asyncio.Task] = set()
            await asyncio.gather(*(self._stream(s, http, asyncio.Semaphore(s.in_flight),
                                                pending) for s in STREAMS))
            if pending:
                await asyncio.wait(pending, timeout=30)

    async def _stream(self, stream: Stream, http: httpx.AsyncClient, gate: asyncio.Semaphore,
                      pending: set[asyncio.Task]) -> None:
        tokens = [self.stack.tokens[f"{stream.client}-{i}"]
                  for i in range(CLIENTS[stream.client])]
        start = self.record.started_at
        next_at = time.time()
        while not self.stop.is_set():
            t = time.time() - start
            if t >= self.record.duration:
                return
            rate = stream.rate(self.flooding(t), stream.name in self.active)
            if rate <= 0:
                await asyncio.sleep(0.2)
                next_at = time.time()
                continue
            await gate.acquire()
            self.counter += 1
            n = self.counter
            token = tokens[n % len(tokens)]
            task = asyncio.create_task(self._send(stream, n, token, http, gate))
            pending.add(task)
            task.add_done_callback(pending.discard)
            # Poisson arrivals around the stream's rate: no lock-step bursts.
            next_at += self.rng.expovariate(rate)
            delay = next_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_at = time.time()  # fell behind (machine busy): do not burst to catch up

    async def _send(self, stream: Stream, n: int, token: str, http: httpx.AsyncClient,
                    gate: asyncio.Semaphore) -> None:
        body = stream.job(n, self.rng)
        job = Job(n, stream.name, stream.client, stream.task, stream.priority,
                  body.get("idempotency_key"), time.time())
        self.record.jobs.append(job)
        try:
            response = await self._post(http, body, token)
            job.status = response.status_code
            doc = response.json()
            if response.status_code == 202:
                job.state, job.id, job.queue = doc.get("state"), doc.get("id"), doc.get("queue")
            else:
                job.error = doc.get("error")
                ra = response.headers.get("retry-after")
                job.retry_after = float(ra) if ra else None
        except (httpx.HTTPError, ValueError) as exc:
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.answered_at = time.time()
            gate.release()


    @staticmethod
    async def _post(http: httpx.AsyncClient, body: dict[str, Any], token: str) -> httpx.Response:
        """POST the job; a keyed job is sent again after a connection error, as a client
        should: the API answers a repeated idempotency key with the first job, never a second.
        An unkeyed job is not: it might have been enqueued, so it is reported unanswered."""
        headers = {"Authorization": f"Bearer {token}"}
        attempts = 3 if body.get("idempotency_key") else 1
        for attempt in range(1, attempts + 1):
            try:
                return await http.post("/v1/jobs", json=body, headers=headers)
            except httpx.TransportError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.2 * attempt)
        raise AssertionError("unreachable")


class Sampler(threading.Thread):
    """Depths, dead letters, deferred counts and breaker states every half second."""

    def __init__(self, observer: Any, record: StormRecord) -> None:
        super().__init__(name="sampler", daemon=True)
        self.observer = observer
        self.record = record
        self.halt = threading.Event()
        self.errors = 0

    def take(self) -> Sample | None:
        try:
            snap = self.observer.snapshot()
        except Exception:
            self.errors += 1
            return None
        queues = {q.name: {"ready": q.ready, "in_flight": q.in_flight, "delayed": q.delayed,
                           "dead_letter": q.dead_letter, "deferred": q.deferred}
                  for q in snap.queues}
        breakers = {b.dependency: b.state for b in snap.breakers}
        sample = Sample(round(time.time() - self.record.started_at, 2), queues, breakers,
                        tuple(snap.errors))
        self.record.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.halt.is_set():
            began = time.monotonic()
            self.take()
            self.halt.wait(max(0.05, SAMPLE_INTERVAL_S - (time.monotonic() - began)))


def started_marks(state: Any, task: str = "payments.charge") -> list[str]:
    """Idempotency marks still "started": deliveries in progress right now."""
    prefix = f"tidegate:idem:{task}:"
    found = []
    for key in state.scan_iter(match=prefix + "*", count=500):
        raw = state.get(key)
        if raw and json.loads(raw).get("s") == "started":
            found.append(key.decode()[len(prefix):])
    return found


def _sleep_until(record: StormRecord, t: float, stop: threading.Event) -> None:
    delay = t - (time.time() - record.started_at)
    if delay > 0:
        stop.wait(delay)


def idle(sample: Sample | None) -> bool:
    """Nothing ready, in flight (held retries included) or waiting in SQS, and every figure
    read: a reading that failed is not a zero."""
    if sample is None or sample.errors:
        return False
    return all(q["ready"] == 0 and q["in_flight"] == 0 and not q["delayed"]
               and not q["deferred"] for q in sample.queues.values())


def run_storm(stack: DemoStack, observer: Any, state: Any, duration: float,
              progress: Callable[[str], None] = print) -> StormRecord:
    """Run the scripted storm against ``stack``, then wait for the pipeline to drain."""
    phases = Phases(duration)
    record = StormRecord(time.time(), duration, phases)
    record.drain_timeout = max(60.0, stack.timings.visibility_timeout_s + 40.0)
    sims = stack.sims
    stop = threading.Event()
    sampler = Sampler(observer, record)
    flood = Flood(stack, record)

    def say(text: str) -> None:
        record.event(text)
        progress(f"[{time.time() - record.started_at:6.1f}s] {text}")

    # A failure phase lasts until its effect was seen, however late the script runs on a busy
    # machine: a breaker opens only once failures outweigh a whole window's successes.
    hold = 2 * stack.timings.window_s

    script: list[tuple[float, Callable[[], None]]] = [
        (phases.flood[0], lambda: say("flood starts: several times what the workers can do")),
        (phases.payments_failing[0], lambda: (sims["payments"].control(
            mode="failing", error_rate=1.0, latency_ms=20), record.phase("payments failing"),
            say("payments downstream failing"))),
        (phases.scraper[0], lambda: (flood.active.add("scraper"), record.phase("scraper"),
                                     say("scraper client starts, far over its rate limit"))),
        (phases.email_down[0], lambda: (sims["email"].control(mode="down", latency_ms=200),
                                        record.phase("email down"),
                                        say("email downstream down"))),
        (phases.payments_failing[1], lambda: (
            _until_sampled(record, "the payments breaker open", hold, say,
                           lambda s: s.breakers.get("payments") == "open"),
            sims["payments"].control(mode="healthy", latency_ms=20),
            record.phase("payments failing"), say("payments downstream healthy again"))),
        (phases.scraper[1], lambda: (
            _until_seen(record, "a 429 to the scraper", hold, say,
                        lambda: any(j.status == 429 for j in list(record.jobs))),
            flood.active.discard("scraper"), record.phase("scraper"),
            say("scraper client stops"))),
        (phases.email_down[1], lambda: (
            _until_sampled(record, "the email breaker open and email deferred to SQS", hold,
                           say, lambda s: s.breakers.get("email") == "open"
                           and (s.queues.get("email") or {}).get("deferred")),
            sims["email"].control(mode="healthy", latency_ms=200),
            record.phase("email down"), say("email downstream back"))),
        (phases.kill, lambda: _kill(stack, state, record, say)),
        (phases.flood[1], lambda: say("flood ends: back to the normal rate")),
    ]
    say("storm starts (warm-up at a normal rate)")
    sampler.start()
    flood.thread.start()
    try:
        for at, action in sorted(script, key=lambda item: item[0]):
            _sleep_until(record, at, stop)
            action()
        _sleep_until(record, duration, stop)
        say(f"storm over: {len(record.jobs)} requests sent; draining")
        flood.stop.set()
        flood.thread.join(40)
        quiet = 0
        deadline = time.monotonic() + record.drain_timeout
        while time.monotonic() < deadline:
            sample = record.samples[-1] if record.samples else None
            quiet = quiet + 1 if idle(sample) else 0
            if quiet >= 3:  # three idle readings in a row, ~1.5 s
                record.drained_at = round(time.time() - record.started_at, 1)
                say("drained: every queue and the SQS deferral queue are empty")
                break
            stop.wait(SAMPLE_INTERVAL_S)
        else:
            say(f"drain timed out after {record.drain_timeout:.0f}s: what is left is listed")
    finally:
        flood.stop.set()
        sampler.halt.set()
        sampler.join(10)
    return record


def _until_sampled(record: StormRecord, what: str, seconds: float, say: Callable[[str], None],
                   seen: Callable[[Sample], Any]) -> None:
    """Wait (``seconds`` at most) until a sample shows ``what``; say so if none did."""
    _until_seen(record, what, seconds, say,
                lambda: any(seen(sample) for sample in list(record.samples)))


def _until_seen(record: StormRecord, what: str, seconds: float, say: Callable[[str], None],
                found: Callable[[], Any]) -> None:
    """Wait (``seconds`` at most) until ``found()``; say so if it never was."""
    if found():
        return
    began = time.monotonic()
    try:
        wait_until(found, seconds, interval=SAMPLE_INTERVAL_S / 2, message=what)
    except AssertionError:
        say(f"{what} not seen within {seconds:.0f}s more: the phase ends anyway")
        return
    say(f"{what}: seen {time.monotonic() - began:.1f}s after the phase's scripted end")


def _kill(stack: DemoStack, state: Any, record: StormRecord, say: Callable[[str], None]) -> None:
    """SIGKILL the payments worker while charges are in progress at the provider.

    The provider is slowed to ``KILL_LATENCY_MS`` so a charge lasts long enough for the signal
    to land during it, and the kill waits until the provider's ledger shows one in progress
    (an unkeyed one for 5 s first: it is the case that must not run twice; any after that;
    10 s at most). What the dead worker held is then read from its idempotency marks still
    "started": the worker cannot finish or clean up anything any more.
    """
    sim = stack.sims["payments"]
    sim.control(mode="healthy", latency_ms=KILL_LATENCY_MS)
    at_provider: list[str] = []
    for unkeyed, seconds in ((True, 5.0), (False, 5.0)):
        try:
            at_provider = wait_until(
                lambda u=unkeyed: [k for k in sim.in_progress()
                                   if not (u and k.startswith(KEY_PREFIX))],
                seconds, interval=0.02, message="a charge in progress at the provider")
            break
        except AssertionError:
            continue
    worker = stack.kill_worker("payments")
    record.killed_at = round(time.time() - record.started_at, 1)
    sim.control(mode="healthy", latency_ms=LATENCY_MS["payments"])
    record.killed_at_provider = at_provider
    record.killed_in_flight = started_marks(state)
    say(f"payments worker {worker.node.split('@')[0]} SIGKILLed with {len(at_provider)} "
        f"charge(s) in progress at the provider, {len(record.killed_in_flight)} delivery(ies) "
        "held (marks started)")
    time.sleep(record.phases.restart_after)  # scripted: the worker stays dead a moment
    say("payments worker restarting")

    def restart() -> None:
        stack.restart_worker("payments")
        say("payments worker restarted and consuming")

    threading.Thread(target=restart, name="restart", daemon=True).start()
