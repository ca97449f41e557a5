"""The simulator honours idempotency keys like a real provider: atomic check-and-claim per key,
409 while a key's first request is in progress, and a ledger of every application."""

from __future__ import annotations

import asyncio

import httpx

from tidegate.downstream import create_app


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


async def _concurrent_same_key() -> tuple[list[httpx.Response], dict]:
    app = create_app("payments")
    async with _client(app) as sim:
        await sim.post("/control", json={"latency_ms": 200})
        body = {"account": "a-1", "amount_cents": 100}
        first, second = await asyncio.gather(
            sim.post("/effects/charge", json=body, headers={"Idempotency-Key": "k-1"}),
            sim.post("/effects/charge", json=body, headers={"Idempotency-Key": "k-1"}),
        )
        after = await sim.post("/effects/charge", json=body, headers={"Idempotency-Key": "k-1"})
        return [first, second, after], (await sim.get("/ledger")).json()


def test_a_key_in_progress_is_refused_with_409_and_applied_once() -> None:
    (first, second, after), ledger = asyncio.run(_concurrent_same_key())
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    winner = first if first.status_code == 200 else second
    loser = second if winner is first else first
    assert loser.headers["retry-after"] == "1"
    assert winner.json()["duplicate"] is False
    # Once the first request finished, the same key gets its result back, applied nothing.
    assert after.status_code == 200
    assert after.json()["duplicate"] is True and after.json()["id"] == winner.json()["id"]
    assert ledger["applied"] == 1 and len(ledger["applications"]) == 1
    assert ledger["conflicts"] == 1 and ledger["duplicates"] == 1
    assert ledger["in_progress"] == []
    assert ledger["applications"][0]["payload"] == {"account": "a-1", "amount_cents": 100}


async def _failed_then_retried() -> dict:
    app = create_app("payments")
    async with _client(app) as sim:
        await sim.post("/control", json={"mode": "down"})
        down = await sim.post("/effects/charge", json={}, headers={"Idempotency-Key": "k-2"})
        assert down.status_code == 503
        await sim.post("/control", json={"mode": "healthy"})
        again = await sim.post("/effects/charge", json={}, headers={"Idempotency-Key": "k-2"})
        assert again.status_code == 200 and again.json()["duplicate"] is False
        return (await sim.get("/ledger")).json()


def test_a_failed_first_request_frees_its_key() -> None:
    ledger = asyncio.run(_failed_then_retried())
    assert ledger["applied"] == 1 and ledger["in_progress"] == [] and ledger["conflicts"] == 0


async def _two_keys_one_job() -> dict:
    app = create_app("payments")
    async with _client(app) as sim:
        for key in ("k-a", "k-b"):  # the same charge sent under two keys: two applications
            await sim.post("/effects/charge", json={"account": "job-9"},
                           headers={"Idempotency-Key": key})
        return (await sim.get("/ledger")).json()


def test_the_ledger_shows_every_application_so_a_double_cannot_hide() -> None:
    ledger = asyncio.run(_two_keys_one_job())
    accounts = [a["payload"]["account"] for a in ledger["applications"]]
    assert accounts == ["job-9", "job-9"]
