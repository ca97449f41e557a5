"""``search.index``: idempotent (indexing the same document twice is harmless)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from workers import headers
from workers.downstream import client_for


@shared_task(name="search.index", bind=True)
def index(self: Any, doc_id: str, body: dict[str, Any] | None = None,
          idempotency_key: str | None = None) -> dict[str, Any]:
    """Index one document in the search service."""
    return client_for("search").post(
        "/effects/index", {"doc_id": doc_id, "body": body or {}},
        idempotency_key=headers.idempotency_key(self.request, idempotency_key) or f"index:{doc_id}",
    )
