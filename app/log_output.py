"""Where the server's log lines go: standard error, written once per pass of the event loop.

A few lines are logged per request at INFO (queued, dispatched, finished). Written one by
one, each was a write system call on the event loop, and on a disk busy with fsyncs a write
can wait for the filesystem's journal. Here the lines logged while the loop runs one pass
are written together, at the end of that pass (the same idea as the websocket frames in
app/web/corked_transport.py). A line logged outside the event loop's thread (a worker
thread, start-up, shutdown) is written at once, after any still waiting, so the order holds.

What this trades: a process killed with SIGKILL loses the lines of the pass it was in (a
fraction of a millisecond of logging); an orderly exit or an exception writes them
(logging.shutdown flushes). Requests are never at stake: their state is in SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecondCachedFormatter(logging.Formatter):
    """logging.Formatter with `asctime` exactly as its default (2026-12-01 16:44:37,512), the
    date and time formatted once per second instead of once per line."""

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._date_time = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            # Two threads may both get here in the same second: both compute the same text.
            self._date_time = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._date_time},{int(record.msecs):03d}"  # logging's default_msec_format


class LoopPassHandler(logging.StreamHandler):
    """A StreamHandler that writes the lines logged in one pass of the event loop together."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._waiting.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if len(self._waiting) > 1:
            return  # a write is already due at the end of this pass
        try:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._write_waiting)
        except RuntimeError:  # no loop running in this thread, or it is closing: write now
            self._write_waiting()

    def _write_waiting(self) -> None:
        assert self.lock is not None  # created by logging.Handler (a reentrant lock)
        with self.lock:
            if not self._waiting:
                return
            text, self._waiting = "".join(self._waiting), []
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": text.rstrip()}))

    def flush(self) -> None:
        self._write_waiting()
        super().flush()
