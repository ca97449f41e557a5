"""Reading a request before anything is decided: bearer tokens, a bounded body, JSON no
deeper than :data:`~producers.http_schema.MAX_NESTING`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from .http_errors import ClientGone, Problem
from .http_schema import MAX_NESTING


class Tokens:
    """Bearer tokens, looked up by their SHA-256 (so the time taken says nothing about how much
    of a token matched); a client is named by its token's hash."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        # digest -> client name: one hash and one dict lookup per request instead of a
        # constant-time comparison with every token (41 of them cost the event loop 4%)
        self._by_digest = {hashlib.sha256(t).digest(): "token-" + hashlib.sha256(t).hexdigest()[:16]
                           for t in self._tokens}

    def client(self, header: str | None) -> str:
        if not self._tokens:
            raise Problem(401, "unauthorized",
                          "no API tokens are configured (set TIDEGATE_API_TOKENS)")
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Problem(401, "unauthorized", "missing bearer token (Authorization: Bearer ...)")
        client = self._by_digest.get(hashlib.sha256(value.strip().encode()).digest())
        if client is None:
            raise Problem(401, "unauthorized", "invalid bearer token")
        return client


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 as soon as it is known to exceed ``limit``."""
    return await read_bounded(request.headers.get("content-length"), request.stream(), limit)


async def read_bounded(declared: str | None, chunks: AsyncIterator[bytes], limit: int
                       ) -> bytes:
    """A body from its declared Content-Length and its ``chunks``, refused with 413 as soon as
    it is known to exceed ``limit`` (declared, or streamed: chunked or lying about its length);
    a client gone mid-body is :class:`ClientGone` (the chunks raise ``ClientDisconnect``)."""
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise Problem(400, "bad_request", "invalid Content-Length") from None
        if too_big:
            raise Problem(413, "payload_too_large",
                          f"body of {declared} bytes exceeds the limit of {limit} bytes")
    parts, size = [], 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise Problem(413, "payload_too_large",
                              f"body exceeds the limit of {limit} bytes")
            parts.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _parse_json(raw: bytes) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise Problem(422, "invalid_json", f"body is not valid JSON: {exc}", field="body"
                      ) from None
    if _nesting_exceeds(value, MAX_NESTING):  # else validation/serialisation recurse: a 500
        raise Problem(422, "invalid_json", f"body nests deeper than {MAX_NESTING} levels",
                      field="body")
    return value


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests arrays/objects deeper than ``limit`` (iterative: no
    recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
