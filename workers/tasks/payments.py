"""``payments.charge``: not idempotent unless the caller gives an idempotency key."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from workers import headers
from workers.downstream import client_for


@shared_task(name="payments.charge", bind=True)
def charge(self: Any, account: str, amount_cents: int, currency: str = "EUR",
           idempotency_key: str | None = None) -> dict[str, Any]:
    """Charge ``amount_cents`` to ``account`` through the payments provider."""
    key = headers.idempotency_key(self.request, idempotency_key) or self.request.id
    return client_for("payments").post(
        "/effects/charge",
        {"account": account, "amount_cents": amount_cents, "currency": currency},
        idempotency_key=key,
    )
