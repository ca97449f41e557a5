"""Redis writes sent without waiting for their replies: one connection per worker thread.

Why: in a thread-pool worker, a thread that blocks on a reply hands the GIL to another thread
and then queues to get it back. For a short task that wait costs more than the task itself:
measured on the pipeline benchmark, the one "done" mark per task cost more worker CPU than
everything else Tidegate adds. A write whose answer changes nothing the task does next
needs no wait: it only has to reach Redis before the task's ack does.

How: :meth:`ReplyLater.send` writes the command to this thread's own connection and returns.
Replies are read later, all at once, when ``max_unread`` have piled up, and by :meth:`close`;
an error reply is logged with the key it was about. A connection that breaks (a send fails,
or reading the replies does) is opened again and everything still unanswered is sent again,
so only repeatable commands belong here (``SET key value``). Ordering: each thread's
command is in its socket before the thread goes on to ack, and a socket's data is delivered
even if the process is killed right after, so Redis sees the mark before the ack.

:meth:`ReplyLater.call` is the one round trip on a line: a command whose answer the caller
needs (a non-idempotent task's mark), sent after the line's unanswered writes and answered
with them, without redis-py's pool checkout (whose readiness check costs a thread-pool
worker three more GIL hand-offs per command).

redis-py has pipelines (sent and answered in one go) but nothing that lets a caller move on
before the answer, hence this small class. Its connections come from the client's own
connection settings (timeouts, TLS, credentials), outside the client's pool: one per thread
of a threads or prefork worker (under gevent or eventlet, one per greenlet: not meant there).
Every write calls ``connect()`` first (a no-op when connected): redis-py's own lazy connect in
``send_packed_command`` skips a Sentinel-managed connection's master lookup and would open
``localhost:6379`` instead of the master the sentinels name.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any

log = logging.getLogger("tidegate.redis")

__all__ = ["ReplyLater", "ReplyLaterError", "pack"]


def pack(commands: tuple[tuple[Any, ...], ...], encoding: str = "utf-8",
         errors: str = "strict") -> bytes | None:
    """``commands`` in Redis' wire format, byte for byte what redis-py's packer makes, as one
    bytes object; None for an argument this does not take (anything but str, bytes, int,
    float, or a command name with a space: redis-py's packer then does it).

    Why: redis-py's pure-Python packer took 42 us for a done mark, its status and its ack
    (8 commands, 25 arguments; this: 18 us), and that write is made on the worker's main
    loop, the stage every message goes through. One bytes object is also one ``sendall``
    (redis-py's chunks of over 6 KB would each be one more GIL hand-off)."""
    out: list[bytes] = []
    for command in commands:
        name = command[0]
        if type(name) is not str or " " in name:
            return None
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                arg = arg.encode(encoding, errors)
            elif kind is int or kind is float:
                arg = repr(arg).encode()
            elif kind is not bytes:
                return None
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class ReplyLaterError(OSError):
    """A write could not be handed to Redis even after reconnecting once."""


class _Line:
    """One thread's connection and the commands on it that Redis has not answered yet."""

    __slots__ = ("conn", "opened", "pid", "unread")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.unread: deque[tuple[Any, ...]] = deque()
        self.opened = 0  # times the connection was opened again (see ``ReplyLater.call``)


class ReplyLater:
    """Fire-and-forget writes on a redis-py client's connection settings (thread-safe)."""

    def __init__(self, client: Any, *, max_unread: int = 64,
                 name: str = "tidegate-reply-later") -> None:
        import redis

        if max_unread < 1:
            raise ValueError(f"max_unread must be >= 1, got {max_unread}")
        pool = client.connection_pool
        # no health check: its PING would read a reply that belongs to an earlier write.
        # The name shows these connections in CLIENT LIST.
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0, "client_name": name}
        self._new_connection = lambda: pool.connection_class(**kwargs)
        self._max_unread = max_unread
        self._local = threading.local()
        self._lines: list[_Line] = []  # every thread's, for close()
        self._lines_lock = threading.Lock()
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._reply_error = redis.exceptions.ResponseError

    def send(self, *command: Any) -> None:
        """Write ``command`` and return without its reply. Raises ReplyLaterError when the
        connection is down and cannot be opened again (nothing unanswered is then known to
        be stored)."""
        line = self._line()
        if len(line.unread) >= self._max_unread:
            self._read_replies(line)
        line.unread.append(command)
        try:
            self._write(line, (command,))
        except self._errors as exc:
            self._resend(line, exc)

    def send_many(self, *commands: tuple[Any, ...]) -> None:
        """Write several commands in one socket write (one syscall, one GIL hand-off instead
        of one each: a task's start and end writes); otherwise as :meth:`send`."""
        if not commands:
            return
        line = self._line()
        if len(line.unread) + len(commands) > self._max_unread:
            self._read_replies(line)
        line.unread.extend(commands)
        try:
            self._write(line, commands)
        except self._errors as exc:
            self._resend(line, exc)

    def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """A round trip on this thread's line: ``commands`` in one socket write after the
        writes still unanswered, then every reply read; returns the replies to ``commands``
        (an error reply as its exception object, not raised).

        Why: a command through redis-py's pool checks its connection out first, and that
        check (a non-blocking ``recv`` between two ``settimeout`` calls) is three more points
        where a thread-pool worker gives up the GIL and queues to get it back; here a round
        trip is one ``send`` and one ``recv``. Raises ReplyLaterError when the connection
        breaks or cannot be opened: whether ``commands`` ran is then unknown (the caller
        decides what a repeat means; the unanswered writes are sent again as usual)."""
        line = self._line()
        try:
            self._write(line, commands)
        except self._errors as exc:
            self._resend(line, exc)
            raise ReplyLaterError(f"Redis connection broke ({exc}): the call was not "
                                  "answered") from None
        opened = line.opened
        self._read_replies(line)  # the writes sent before: logged as usual
        if line.opened != opened:  # reopened while reading them: the call was lost or ran
            raise ReplyLaterError("Redis connection broke: the call was not answered")
        replies: list[Any] = []
        try:
            for _ in commands:
                try:
                    replies.append(line.conn.read_response())
                except self._reply_error as exc:
                    replies.append(exc)
        except self._errors as exc:
            line.conn.disconnect()
            raise ReplyLaterError(f"Redis connection broke ({exc}): the call was not "
                                  "answered") from None
        return replies

    def unread(self) -> int:
        """Commands sent on this thread's line whose replies have not been read yet."""
        line = getattr(self._local, "line", None)
        return len(line.unread) if line is not None else 0

    def flush(self) -> None:
        """Read this thread's pending replies (their errors are logged)."""
        line = getattr(self._local, "line", None)
        if line is not None and line.pid == os.getpid():
            self._read_replies(line)

    def close(self) -> None:
        """Read every line's pending replies and close the connections (at shutdown)."""
        with self._lines_lock:
            lines, self._lines = self._lines, []
        for line in lines:
            if line.pid != os.getpid():
                continue  # a parent's socket, inherited by fork: not ours to read or close
            try:
                self._read_replies(line)
            except ReplyLaterError as exc:
                log.warning("%d writes may not be stored: %s", len(line.unread), exc)
            line.conn.disconnect()

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _write(line: _Line, commands: tuple[tuple[Any, ...], ...]) -> None:
        """``commands`` in one socket write. ``connect()`` first (a no-op when connected):
        redis-py's own lazy connect skips a Sentinel-managed connection's master lookup."""
        conn = line.conn
        conn.connect()
        packed = pack(commands, conn.encoder.encoding, conn.encoder.encoding_errors)
        conn.send_packed_command([packed] if packed is not None
                                 else conn.pack_commands(commands), False)

    def _line(self) -> _Line:
        line: _Line | None = getattr(self._local, "line", None)
        if line is None or line.pid != os.getpid():
            line = _Line(self._new_connection())
            self._local.line = line
            with self._lines_lock:
                self._lines.append(line)
        return line

    def _read_replies(self, line: _Line) -> None:
        resent = False
        while line.unread:
            try:
                line.conn.read_response()
            except self._reply_error as exc:
                log.warning("Redis refused %s %s: %s", line.unread[0][0], line.unread[0][1], exc)
            except self._errors as exc:
                if resent:  # answered by a fresh connection, and broken again: give up
                    line.conn.disconnect()
                    lost = len(line.unread)
                    line.unread.clear()
                    raise ReplyLaterError(f"Redis connection keeps breaking ({exc}): {lost} "
                                          "writes may not be stored") from None
                self._resend(line, exc)
                resent = True
                continue
            line.unread.popleft()

    def _resend(self, line: _Line, exc: BaseException) -> None:
        """The connection broke: open it again and send everything still unanswered."""
        line.conn.disconnect()
        line.opened += 1
        try:
            self._write(line, tuple(line.unread))
        except self._errors as again:
            line.conn.disconnect()
            lost = len(line.unread)
            line.unread.clear()
            raise ReplyLaterError(f"Redis unreachable ({exc}; then {again}): {lost} writes "
                                  "may not be stored") from None
