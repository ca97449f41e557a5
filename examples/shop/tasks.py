"""The shop's two dependencies, one task each.

``inventory.reserve`` is idempotent: reserving the same order's stock twice is harmless (the
inventory service honours the idempotency key), so a failed call is retried. ``payments.capture``
is not: a capture that failed after reaching the provider may have taken the money, so it is
dead-lettered for a person to look at rather than tried again (unless the caller gives an
idempotency key the provider honours).
"""

from __future__ import annotations

from typing import Any

from workers.downstream import client_for
from workers.resilient import resilient_task


@resilient_task("inventory.reserve", dependency="inventory", idempotent=True)
def reserve(self: Any, order_id: str, sku: str, quantity: int = 1) -> dict[str, Any]:
    """Hold ``quantity`` of ``sku`` for ``order_id``."""
    return self.write(
        "inventory", client_for("inventory", self.app).post, "/effects/reserve",
        {"order_id": order_id, "sku": sku, "quantity": quantity},
        idempotency_key=self.idempotency_key or f"reserve:{order_id}:{sku}",
    )


@resilient_task("payments.capture", dependency="payments", idempotent=False)
def capture(self: Any, order_id: str, amount_cents: int,
            idempotency_key: str | None = None) -> dict[str, Any]:
    """Capture the order's payment."""
    return self.write(
        "payments", client_for("payments", self.app).post, "/effects/capture",
        {"order_id": order_id, "amount_cents": amount_cents},
        idempotency_key=self.idempotency_key or self.request.id,
    )
