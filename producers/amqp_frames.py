"""A batch's ``basic.publish`` frames, byte for byte what py-amqp writes, encoded in less time.

Why: py-amqp serializes every message's properties and ~25-entry header table from scratch
(``GenericContent._serialize_properties``, ``serialization.dumps``) and writes each message's
method, header and body frames in a write of their own; that was about 40% of a RabbitMQ
batch's time (bench/RESULTS.md, issue 19). The messages of a batch built from one template
(:mod:`producers.messages`) share most header values as the very same objects, so each
header entry is encoded once per batch and reused wherever its value is that same object
again; only the per-job values (id, reprs, Tidegate's headers) are encoded per message. The
frames are collected for one socket write per chunk of the batch (:class:`producers.batch.
AmqpConfirms`).

Exactness: the table entries are encoded by py-amqp's own ``_write_item`` (strings, numbers,
booleans and None by the same rules, inline), everything else by py-amqp's own ``dumps``;
:func:`reference_frames` gives what py-amqp's ``frame_writer`` would write for a message, and
the batch compares the two for its first message (a mismatch turns this encoder off).
A message too large for py-amqp's single-frame body (``frame_max``) is left to py-amqp.
"""

from __future__ import annotations

from io import BytesIO
from struct import pack
from types import SimpleNamespace
from typing import Any

from amqp import Message, spec
from amqp.method_framing import FRAME_OVERHEAD, frame_writer
from amqp.serialization import _write_item, dumps

__all__ = ["FrameEncoder", "reference_frames"]

_PUBLISH = spec.Basic.Publish  # (60, 40)
_CLASS = _PUBLISH[0]
_END = b"\xce"
_INT_MAX = 2147483647  # py-amqp's bounds for a table's 32-bit 'I' integer


class FrameEncoder:
    """The frames of ``basic.publish`` of one message on one channel (see the module doc).

    :meth:`reset` between batches: an entry is reused only for the identical object within
    one batch, so a value mutated between batches is encoded again.
    """

    def __init__(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self._methods: dict[tuple[Any, ...], tuple[bytes, int]] = {}
        self._entries: dict[Any, tuple[Any, bytes]] = {}  # header key -> (value, its entry)
        self._keys: dict[str, bytes] = {}  # header key -> its length-prefixed bytes

    def reset(self) -> None:
        self._entries.clear()

    def frames(self, msg: Any, exchange: str, routing_key: str, mandatory: bool,
               immediate: bool, frame_max: int) -> bytes | None:
        """The message's method, header and body frames; None where py-amqp would split its
        body into several frames (then py-amqp writes it)."""
        key = (exchange, routing_key, mandatory, immediate)
        method = self._methods.get(key)
        if method is None:
            args = dumps("Bssbb", (0, exchange, routing_key, mandatory, immediate))
            payload = pack(">HH", *_PUBLISH) + args
            method = (pack(">BHI", 1, self.channel_id, len(payload)) + payload + _END,
                      len(args))
            self._methods[key] = method
        body = msg.body
        if isinstance(body, str):  # as py-amqp: encoded with (and recording) its encoding
            body = body.encode(msg.properties.setdefault("content_encoding", "utf-8"))
        properties = self.properties(msg.properties)
        size = len(body)
        if method[1] + len(properties) + size + FRAME_OVERHEAD > frame_max - 8:
            return None
        header = pack(">HHQ", _CLASS, 0, size) + properties
        parts = [method[0], pack(">BHI", 2, self.channel_id, len(header)), header, _END]
        if size:
            parts += [pack(">BHI", 3, self.channel_id, size), body, _END]
        return b"".join(parts)

    def properties(self, props: dict[str, Any]) -> bytes:
        """``Message._serialize_properties``: the flags, then each property that is not None,
        in ``Message.PROPERTIES`` order (``dumps``'s rules for each kind)."""
        flags = 0
        out = []
        for bit, name, kind in _PROPERTIES:
            value = props.get(name)
            if value is None:
                continue
            flags |= bit
            if kind == "s":
                out.append(_shortstr(value))
            elif kind == "F":
                out.append(self.table(value or {}))
            elif kind == "o":
                out.append(pack("B", value))
            else:
                out.append(dumps(kind, [value]))
        return pack(">H", flags) + b"".join(out)

    def table(self, table: dict[Any, Any]) -> bytes:
        """py-amqp's ``_write_table``: each entry's key and item, the whole length-prefixed."""
        entries, keys = self._entries, self._keys
        parts = []
        for k, v in table.items():
            hit = entries.get(k)
            if hit is not None and hit[0] is v:
                parts.append(hit[1])
                continue
            name = keys.get(k) if isinstance(k, str) else None
            if name is None:
                raw = k.encode("utf-8", "surrogatepass") if isinstance(k, str) else k
                name = pack("B", len(raw)) + raw
                if isinstance(k, str):
                    keys[k] = name
            entry = name + _item(v)
            entries[k] = (v, entry)
            parts.append(entry)
        data = b"".join(parts)
        return pack(">I", len(data)) + data


def _item(v: Any) -> bytes:
    """One table value as py-amqp's ``_write_item`` writes it (common types inline)."""
    kind = type(v)
    if kind is str:
        raw = v.encode("utf-8", "surrogatepass")
        return pack(">cI", b"S", len(raw)) + raw
    if kind is float:
        return pack(">cd", b"d", v)
    if kind is int:
        if v > _INT_MAX or v < -_INT_MAX:
            return pack(">cq", b"L", v)
        return pack(">ci", b"I", v)
    if v is None:
        return b"V"
    out = BytesIO()
    _write_item(v, out.write, [])
    return out.getvalue()


def _shortstr(value: Any) -> bytes:
    value = value or ""  # as dumps: a false value is the empty string
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return pack("B", len(raw)) + raw


# Message.PROPERTIES with each one's flag bit: one bit per property from the top
# (content_type 0x8000 ... cluster_id 0x0004), fourteen: one flags word.
_PROPERTIES = [(0x8000 >> i, name, kind) for i, (name, kind) in enumerate(Message.PROPERTIES)]


def reference_frames(msg: Any, channel_id: int, exchange: str, routing_key: str,
                     mandatory: bool, immediate: bool, frame_max: int) -> bytes:
    """What py-amqp's own ``frame_writer`` writes for ``basic.publish`` of ``msg``."""
    written: list[bytes] = []
    connection = SimpleNamespace(frame_max=frame_max, bytes_sent=0)
    write = frame_writer(connection, SimpleNamespace(write=lambda b: written.append(bytes(b))))
    write(1, channel_id, _PUBLISH, dumps("Bssbb", (0, exchange, routing_key, mandatory,
                                                   immediate)), msg)
    return b"".join(written)
