"""Moving a Redis broker from Tidegate's old key layout to kombu's stock one: ``tidegate migrate``.

Until this release Tidegate's Redis transport used ``":"`` as kombu's separator, so a
queue's priority lists were ``q:3``, ``q:6``, ``q:9`` and each exchange binding in
``_kombu.binding.<exchange>`` read ``routing_key:pattern:queue``. Stock clients (Flower,
``celery --broker=URL inspect``, a bare Celery producer) use kombu's default ``"\\x06\\x16"``
(:data:`workers.topology.REDIS_SEP`), which Tidegate uses now. A broker written by the old
version keeps two things the new workers cannot read:

* messages waiting in ``q:3`` / ``q:6`` / ``q:9`` (priority 0 lives in ``q`` in both layouts,
  and the ``unacked`` hash holds no separator): moved to the new lists, oldest still first;
* bindings joined with ``":"``: rewritten with the new separator (kombu's ``get_table`` would
  fail on them with ``not enough values to unpack``). A binding that does not split into
  exactly three parts is dropped: its consumer declares it again when it next starts.

Safe to run again (a second run finds nothing), and while new workers run: each message moves
in one script call (popped and pushed together), so none is lost or doubled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from workers.topology import REDIS_PRIORITY_STEPS, REDIS_SEP

OLD_SEP = ":"
BINDING_PREFIX = "_kombu.binding."
MOVE_BATCH = 1000

# KEYS: 1 old list, 2 new list. ARGV: 1 at most this many. The old list's oldest message is at
# its right end (kombu LPUSHes, pops right): taking from the left and pushing right puts the
# old list, in order, behind (= popped before) whatever the new list already holds.
_MOVE = """
local n = 0
while n < tonumber(ARGV[1]) do
  local item = redis.call('LPOP', KEYS[1])
  if not item then break end
  redis.call('RPUSH', KEYS[2], item)
  n = n + 1
end
return n
"""


@dataclass
class MigrationReport:
    """What :func:`migrate` found (and, unless a dry run, changed)."""

    moved: dict[str, int] = field(default_factory=dict)  # old list -> messages moved
    bindings_rewritten: int = 0
    bindings_dropped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.bindings_rewritten or self.bindings_dropped)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def migrate(client: Any, queues: Iterable[str], *, dry_run: bool = False) -> MigrationReport:
    """Move ``queues``' old priority lists and rewrite old bindings (see the module doc).

    ``queues``: the topology's work queues and DLQs; queues named in old bindings are added.
    """
    report = MigrationReport()
    names = dict.fromkeys(queues)
    for key in client.scan_iter(match=BINDING_PREFIX + "*", count=500):
        for member in client.smembers(key):
            text = _text(member)
            if REDIS_SEP in text:
                continue  # already in kombu's layout
            parts = text.split(OLD_SEP)
            if len(parts) != 3:
                report.bindings_dropped.append(f"{_text(key)}: {text!r}")
                if not dry_run:
                    client.srem(key, member)
                continue
            names.setdefault(parts[2])
            report.bindings_rewritten += 1
            if not dry_run:
                with client.pipeline(transaction=True) as pipe:
                    pipe.srem(key, member)
                    pipe.sadd(key, REDIS_SEP.join(parts))
                    pipe.execute()
    move = client.register_script(_MOVE)
    for queue in filter(None, names):
        for step in REDIS_PRIORITY_STEPS[1:]:
            old, new = f"{queue}{OLD_SEP}{step}", f"{queue}{REDIS_SEP}{step}"
            if dry_run:
                waiting = int(client.llen(old))
                if waiting:
                    report.moved[old] = waiting
                continue
            total = 0
            while moved := int(move(keys=[old, new], args=[MOVE_BATCH])):
                total += moved
            if total:
                report.moved[old] = total
    return report


__all__ = ["OLD_SEP", "MigrationReport", "migrate"]
