"""A task's done mark and its message's ack in one unanswered socket write (Redis broker).

Why: a successful resilient task used to end with its ``done`` mark (with the run lease's
removal and the job's ``succeeded`` status) sent on its thread's reply-later line
(``workers.redis_line``), then Celery's ack: a ``MULTI`` ``ZREM`` ``HDEL`` ``EXEC`` round trip
on the broker. In a thread-pool worker every socket write and every wait for a reply costs a
GIL hand-off, and on a no-op task that is most of what Tidegate adds (docs/delivery.md, "Cost
of job status"). Where the state database is on the broker's own server (``make run``:
databases 0 and 1), the ack's commands follow the done mark on the same line instead: the
task's writes, ``SELECT`` of the broker's database, the ack's ``ZREM`` / ``HDEL``s, ``SELECT``
back, in one socket write, without waiting for the replies.

What it keeps: Redis runs one connection's commands in the order sent, so the mark is stored
before the ack, as before. The line is the acking thread's (Celery's main loop), not the
task thread's that sent the lease and ``running``: two connections keep no order between
them, so ``IdempotencyStore.finish`` reads those writes' replies before it hands the mark
over, and both land after them. A worker killed before Redis read them leaves the message
unacked and its mark ``started``: redelivered, it runs again if idempotent or is
dead-lettered as "outcome unknown", as after any kill before the ack. A line that cannot be
written falls back to kombu's own ack (``workers.transport``); the replies are read later
like every other write on the line (a refused command is logged; a broken connection is
reopened and whatever is unanswered sent again: each of these commands can be repeated).

How: the task (``workers.resilient``) hands a :class:`Rider` to :func:`ride_with_ack` under
its task id; the reliable-fetch transport's ack (``workers.transport.QoS``) takes the riders
of the message it acks. Only where that ack runs in this process and thread (a threads or solo
pool: the consumer was started here, :func:`consuming`), on a plain ``redis://`` broker
whose server holds the state database, without ``global_keyprefix``. A message rejected
instead of acked sends its riders' writes on their own, and so does one that a closing
channel restores unacked (the connection went before Celery acked): its redelivery finds
the done mark and is acked as a duplicate, as before the ack carried the mark.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tidegate.worker")

__all__ = ["Rider", "consuming", "ride_with_ack", "rides_here", "take", "waiting"]

Command = tuple[Any, ...]


@dataclass(frozen=True)
class Rider:
    """One task's writes for the state database, and the line that sends them.

    ``send``: writes commands on the calling thread's reply-later line without waiting (raises
    ``OSError`` when it cannot). ``dbs``: (state database, broker database)."""

    commands: tuple[Command, ...]
    send: Callable[..., None]
    dbs: tuple[int, int]

    def send_with_ack(self, ack: Sequence[Command], extra: Sequence[Command] = ()) -> None:
        """This rider's writes (and ``extra``), then the ack's commands in the broker's
        database, in one socket write. Not a ``MULTI``: a write Redis refuses (out of
        memory) must not take the ack with it, as ``EXECABORT`` would."""
        state_db, broker_db = self.dbs
        self.send(*self.commands, *extra, ("SELECT", broker_db), *ack, ("SELECT", state_db))

    def send_otherwise(self) -> None:
        """No ack carries them: send the writes on their own (never raises)."""
        try:
            self.send(*self.commands)
        except Exception as exc:  # the same outcome as a done mark not stored: logged
            log.warning("state writes %s not stored: %s", [c[:2] for c in self.commands], exc)


_lock = threading.Lock()
_pending: dict[str, list[Rider]] = {}  # task id -> riders waiting for that message's ack
_consumer_pid: int | None = None  # the process whose transport consumes (and so acks)


def consuming() -> None:
    """The reliable-fetch transport started consuming in this process: its acks run here."""
    global _consumer_pid
    _consumer_pid = os.getpid()


def rides_here() -> bool:
    """Whether this process acks the messages it runs (a prefork child does not)."""
    return _consumer_pid == os.getpid()


def ride_with_ack(task_id: str, rider: Rider) -> bool:
    """Queue ``rider`` for the ack of ``task_id``'s message; False where no ack here will
    take it (the caller then sends the writes itself)."""
    if not task_id or not rides_here():
        return False
    with _lock:
        _pending.setdefault(task_id, []).append(rider)
    return True


def waiting() -> bool:
    """Whether any rider waits for an ack (read without the lock: a hint)."""
    return bool(_pending)


def take(task_id: str | None) -> list[Rider]:
    """The riders waiting for ``task_id``'s ack (removed)."""
    if not _pending or not task_id:  # the common empty case without the lock
        return []
    with _lock:
        return _pending.pop(task_id, [])
