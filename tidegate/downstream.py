"""A downstream simulator: the HTTP dependency that tests, the demo and the benchmarks call.

Its behaviour switches at run time (``POST /control``): healthy, failing with an error rate,
down, hanging, or slow. It honours the ``Idempotency-Key`` header like a real payments API:
the check and the claim of a key are one atomic step (no await between them), so

* a key already applied returns the first result and applies nothing (``duplicate: true``);
* a key whose first request is still in progress is answered ``409 Conflict`` (with
  ``Retry-After``): nothing applied, ask again for the first request's outcome;
* a key whose first request failed is free again.

``GET /ledger`` shows every application, in order (``applications``), besides the effect per
key, so a test can prove that an effect happened exactly once and a double can never hide
behind a key; it also counts how often a key was *attempted* (``requests``) and refused as in
progress (``conflicts``), which shows whether a task was run again or twice at once.

Two switches model a real service's limits, so the adaptive limit and hedging have something
to work against: ``capacity`` (requests it serves at full speed at once; above it each
request's latency is stretched by ``in_flight / capacity``, as a processor shared by its
requests, and fails 503 with probability ``overload_error_rate * (1 - capacity /
in_flight)``) and a heavy tail (``tail_rate`` of the requests take ``tail_factor`` times
``latency_ms``). Both apply to ``latency_ms`` as set; ``/ledger`` reports the requests in
flight now and at most (``in_flight``, ``peak_in_flight``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

Mode = Literal["healthy", "failing", "down", "hanging", "slow"]


class Control(BaseModel):
    """The behaviour to switch to."""

    mode: Mode = "healthy"
    error_rate: float = Field(default=1.0, ge=0.0, le=1.0)  # for "failing"
    error_status: int = Field(default=503, ge=400, le=599)
    latency_ms: float = Field(default=0.0, ge=0.0, le=120_000)  # added to every answer
    hang_s: float = Field(default=30.0, ge=0.0, le=600)  # for "hanging": then 504
    apply_then_fail: bool = False  # apply the effect, then answer an error (outcome unknown)
    # the next ``stall_requests`` requests wait ``stall_ms`` before the simulator looks at
    # them (a slow network path: nothing claimed or applied meanwhile); later ones do not
    stall_ms: float = Field(default=0.0, ge=0.0, le=120_000)
    stall_requests: int = Field(default=0, ge=0)
    capacity: int = Field(default=0, ge=0)  # 0: unlimited; see the module's docstring
    overload_error_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    tail_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # this fraction of requests...
    tail_factor: float = Field(default=10.0, ge=1.0, le=1000)  # ...is this many times slower
    price_cents: int = 1999


@dataclass
class Effect:
    op: str
    payload: Any
    applied_at: float
    requests: int = 1
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ledger:
    effects: dict[str, Effect] = field(default_factory=dict)
    applications: list[dict[str, Any]] = field(default_factory=list)  # every one, in order
    in_progress: set[str] = field(default_factory=set)  # keys whose first request is running
    requests: int = 0
    failed: int = 0
    duplicates: int = 0
    conflicts: int = 0

    def apply(self, key: str, op: str, payload: Any, result: dict[str, Any]) -> Effect:
        effect = Effect(op, payload, time.time(), result=result)
        self.effects[key] = effect
        self.applications.append({"key": key, "op": op, "id": result.get("id"),
                                  "applied_at": effect.applied_at, "payload": payload})
        return effect

    def snapshot(self) -> dict[str, Any]:
        return {
            "applied": len(self.applications),
            "requests": self.requests,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "in_progress": sorted(self.in_progress),
            "applications": list(self.applications),
            "effects": {
                k: {"op": e.op, "requests": e.requests, "applied_at": e.applied_at,
                    "payload": e.payload}
                for k, e in self.effects.items()
            },
        }


def create_app(name: str = "downstream", seed: int | None = None) -> FastAPI:
    """The simulator for one dependency named ``name``."""
    app = FastAPI(title=f"tidegate downstream simulator: {name}")
    state = {"control": Control(), "ledger": Ledger(), "attempts": {}, "stalls": 0,
             "in_flight": 0, "peak": 0}
    rng = random.Random(seed)

    async def stall(control: Control) -> None:
        """Hold the first ``stall_requests`` requests after a control for ``stall_ms``."""
        if state["stalls"] > 0:
            state["stalls"] -= 1
            await asyncio.sleep(control.stall_ms / 1000)

    async def loaded(control: Control, in_flight: int) -> None:
        """The latency of one request under the capacity model and the heavy tail."""
        latency = control.latency_ms / 1000
        if control.tail_rate and rng.random() < control.tail_rate:
            latency *= control.tail_factor
        over = control.capacity and in_flight > control.capacity
        if over:
            latency *= in_flight / control.capacity
        if latency:
            await asyncio.sleep(latency)
        if over and rng.random() < control.overload_error_rate * (
                1 - control.capacity / in_flight):
            raise HTTPException(503, f"{name} overloaded ({in_flight} > {control.capacity})")

    async def behave(control: Control) -> None:
        """Apply the switched-in behaviour before an answer; raise to answer an error."""
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            await loaded(control, state["in_flight"])
        finally:
            state["in_flight"] -= 1
        if control.mode == "down":
            raise HTTPException(503, f"{name} is down")
        if control.mode == "hanging":
            await asyncio.sleep(control.hang_s)
            raise HTTPException(504, f"{name} hung for {control.hang_s}s")
        if control.mode == "failing" and rng.random() < control.error_rate:
            raise HTTPException(control.error_status, f"{name} failed (simulated)")

    @app.post("/effects/{op}")
    async def effect(op: str, request: Request,
                     idempotency_key: str | None = Header(default=None)) -> JSONResponse:
        control: Control = state["control"]
        ledger: Ledger = state["ledger"]
        ledger.requests += 1
        key = idempotency_key or f"anon-{uuid.uuid4()}"
        try:
            payload = await request.json()
        except ValueError:
            raise HTTPException(400, "body must be JSON") from None
        await stall(control)
        # Check and claim in one step: no await between them, so two concurrent requests with
        # one key cannot both pass (the event loop runs one handler at a time up to an await).
        seen = ledger.effects.get(key)
        if seen is not None:
            seen.requests += 1
        elif key in ledger.in_progress:
            ledger.conflicts += 1
            return JSONResponse(
                {"detail": f"{name}: a request with this idempotency key is in progress"},
                status_code=409, headers={"Retry-After": "1"})
        else:
            ledger.in_progress.add(key)
        try:
            if control.apply_then_fail and control.mode == "failing":
                if seen is None:
                    ledger.apply(key, op, payload, {"id": str(uuid.uuid4()), "op": op,
                                                    "key": key, "service": name})
                ledger.failed += 1
                raise HTTPException(control.error_status,
                                    f"{name} failed after applying (simulated)")
            try:
                await behave(control)
            except HTTPException:
                ledger.failed += 1
                state["attempts"][key] = state["attempts"].get(key, 0) + 1
                raise
            if seen is not None:
                ledger.duplicates += 1
                return JSONResponse({**seen.result, "duplicate": True})
            result = {"id": str(uuid.uuid4()), "op": op, "key": key, "service": name}
            ledger.apply(key, op, payload, result)
            return JSONResponse({**result, "duplicate": False})
        finally:
            if seen is None:
                ledger.in_progress.discard(key)

    @app.get("/price")
    async def price(sku: str = "default") -> dict[str, Any]:
        control: Control = state["control"]
        state["ledger"].requests += 1
        await stall(control)
        await behave(control)
        return {"sku": sku, "price_cents": control.price_cents, "at": time.time()}

    @app.post("/control")
    async def set_control(control: Control) -> dict[str, Any]:
        state["control"] = control
        state["stalls"] = control.stall_requests
        return control.model_dump()

    @app.get("/control")
    async def get_control() -> dict[str, Any]:
        return state["control"].model_dump()

    @app.get("/ledger")
    async def ledger() -> dict[str, Any]:
        snap = state["ledger"].snapshot()
        snap["failed_attempts"] = dict(state["attempts"])
        snap["in_flight"], snap["peak_in_flight"] = state["in_flight"], state["peak"]
        return snap

    @app.get("/in-progress")
    async def in_progress() -> dict[str, Any]:
        """Keys whose first request is running right now (the ledger without its history)."""
        return {"in_progress": sorted(state["ledger"].in_progress)}

    @app.post("/reset")
    async def reset() -> dict[str, str]:
        state["control"], state["ledger"], state["attempts"] = Control(), Ledger(), {}
        state["peak"] = state["in_flight"]
        state["stalls"] = 0
        return {"status": "reset"}

    @app.get("/health")
    async def health() -> JSONResponse:
        mode = state["control"].mode
        ok = mode in ("healthy", "slow")
        return JSONResponse({"name": name, "mode": mode}, status_code=200 if ok else 503)

    return app


def serve(name: str, host: str, port: int) -> None:
    """Run the simulator until interrupted."""
    import uvicorn

    uvicorn.run(create_app(name), host=host, port=port, log_level="warning", access_log=False)
