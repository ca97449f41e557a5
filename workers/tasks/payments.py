"""``payments.charge``: not idempotent unless the caller gives an idempotency key.

Three steps, three behaviours when a dependency fails:

* the price (when a ``sku`` is given) is a read from ``pricing``: a price at most 5 minutes
  old is served from the cache rather than failing ("prices 5 minutes old rather than an
  error");
* the charge is the effect: no default ever stands in for it. A refusal before calling
  (circuit open) is tried again later; a failure after calling is dead-lettered unless the
  charge carries an idempotency key (then retried: the provider honours the key);
* the receipt (when ``receipt_to`` is given) is non-critical: if the email service fails the
  charge still succeeds and the result says the receipt is unavailable.
"""

from __future__ import annotations

from typing import Any

from workers.downstream import client_for
from workers.resilient import resilient_task


@resilient_task("payments.charge", dependency="payments", idempotent=False)
def charge(self: Any, account: str, amount_cents: int | None = None, currency: str = "EUR",
           sku: str | None = None, receipt_to: str | None = None,
           idempotency_key: str | None = None) -> dict[str, Any]:
    """Charge ``account`` (``amount_cents``, or the current price of ``sku``)."""
    if amount_cents is None:
        if sku is None:
            from workers.errors import InvalidPayload

            raise InvalidPayload("payments.charge needs amount_cents or sku")
        price = self.read("pricing", client_for("pricing").get, "/price", sku=sku)
        amount_cents = int(price["price_cents"])
    # Unkeyed charges still send their task id downstream so the provider's ledger can tell
    # a repeat; Tidegate does not count on it (the task stays non-idempotent).
    key = self.idempotency_key or self.request.id
    result = self.write(
        "payments", client_for("payments").post, "/effects/charge",
        {"account": account, "amount_cents": amount_cents, "currency": currency},
        idempotency_key=key,
    )
    if receipt_to is not None:
        result = {**result, "receipt": self.optional(
            "email", client_for("email").post, "/effects/receipt",
            {"to": receipt_to, "charge": result.get("id"), "amount_cents": amount_cents},
            idempotency_key=f"receipt:{key}",
            message="Your payment went through; the receipt will follow later.",
        )}
    return result
