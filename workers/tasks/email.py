"""``email.send``: idempotent by key; queues for later when the email service is down."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from workers import headers
from workers.downstream import client_for


@shared_task(name="email.send", bind=True)
def send(self: Any, to: str, subject: str, body: str = "",
         idempotency_key: str | None = None) -> dict[str, Any]:
    """Send one email through the email service."""
    return client_for("email").post(
        "/effects/send", {"to": to, "subject": subject, "body": body},
        idempotency_key=headers.idempotency_key(self.request, idempotency_key) or self.request.id,
    )
