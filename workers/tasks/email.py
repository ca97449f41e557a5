"""``email.send``: idempotent by key; queued for later when the email service is down.

The queue-for-later store comes from ``workers.deferral.sink_for("email")``; without one, a
failing email follows the normal path (broker retries, then the dead-letter queue).
"""

from __future__ import annotations

from typing import Any

from workers.downstream import client_for
from workers.resilient import resilient_task


@resilient_task("email.send", dependency="email", idempotent=True)
def send(self: Any, to: str, subject: str, body: str = "",
         idempotency_key: str | None = None) -> Any:
    """Send one email through the email service."""
    return self.write(
        "email", client_for("email").post, "/effects/send",
        {"to": to, "subject": subject, "body": body},
        idempotency_key=self.idempotency_key or self.request.id,
    )
