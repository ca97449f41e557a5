"""``search.index``: idempotent (indexing the same document twice is harmless).

The document's ranking boost is a read from the search service; when that fails the default
(no boost: chronological order, the seed's "return results in chronological order") is used
and the document is still indexed.
"""

from __future__ import annotations

from typing import Any

from workers.downstream import client_for
from workers.resilient import resilient_task


@resilient_task("search.index", dependency="search", idempotent=True)
def index(self: Any, doc_id: str, body: dict[str, Any] | None = None,
          idempotency_key: str | None = None) -> dict[str, Any]:
    """Index one document in the search service."""
    client = client_for("search")
    ranking = self.read("search", client.get, "/price", sku=f"rank:{doc_id}")
    boost = (ranking or {}).get("price_cents", 0) if isinstance(ranking, dict) else 0
    return self.write(
        "search", client.post, "/effects/index",
        {"doc_id": doc_id, "body": body or {}, "boost": boost},
        idempotency_key=self.idempotency_key or f"index:{doc_id}",
    )
