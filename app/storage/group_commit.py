"""Group commit: many writers, one transaction.

Every write of the store is a unit of statements that must commit together. Units wait in a
queue; one writer task takes whatever has gathered (up to `max_batch_rows` statements) and
commits it in a single transaction, so one fsync (synchronous=FULL) serves many requests. A
unit that fails inside a batch does not fail its neighbours: the batch is retried in halves,
and a half that fails is halved again, down to the unit that fails. Unless the database itself
refused it (busy or locked by another process, read-only, full, an I/O error:
REFUSED_BY_DATABASE): that fails every unit of the batch at once, each with that error, since
a unit alone would only wait out the same lock again. Once submitted, a unit is committed even
if its caller is cancelled.

A unit submitted `first` (the health check's heartbeat) goes into the next transaction, one of
its own, ahead of those already waiting: a burst of ten thousand new requests takes the writer
a second or more, and a health probe waiting behind it timed out and called a busy server
unavailable.

A transaction is one call to the connection's thread, and inserts of one row each go in as
multi-row INSERTs: each call and each statement stepped there waits for the event loop or for
the GIL under load (see _run_transaction and _execute_run). Measured with one connection of
pipelined small requests: a 128-row transaction took 20-30 ms that way, 11 ms after.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

# Rows per transaction (STORE_BATCH_ROWS). A batch only fills up under a flood of pipelined
# requests (bots that wait for each `queued` gather ~20 per commit). Then SQLite alone commits
# no cheaper per row past ~100, but each transaction is also a trip to the connection's thread
# whose end waits for the event loop to come round, and the loop is busy reading the flood:
# 20,000 requests over 50 connections were all read and waiting for the writer within 1.2 s,
# which then drained them 128 rows per ~9 ms while the loop idled 13-16 % of the run. At 512,
# the rate went up in 5 of 7 interleaved runs (median 7,250 -> 7,790 requests/s; over one
# connection 6,820 -> 7,400 in 3 of 3), and the writer thread's CPU per request went down.
# The first waiters of a full batch wait longer: under that flood (one connection) a 512-row
# transaction took 31-118 ms as seen from the loop (median 64 ms), against ~9 ms for 128.
MAX_BATCH_ROWS = 512

Statement = tuple[str, Sequence[Any]]

# SQLite's primary result codes for a refusal of the whole database, whichever unit asked.
REFUSED_BY_DATABASE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    }
)


class StoreClosed(RuntimeError):
    """A write came after close(): it was not committed."""


@dataclass(slots=True)
class _WriteUnit:
    statements: list[Statement]
    done: asyncio.Future[None]  # done when the statements are committed (or failed)


# Put in the queue to wake the writer for a unit submitted `first` (which waits apart).
_FIRST = _WriteUnit([], None)  # type: ignore[arg-type]


class GroupWriter:
    """The one writer of a database connection. Use `write`, then `close`."""

    def __init__(self, db: aiosqlite.Connection, max_batch_rows: int) -> None:
        self._writer_db = db
        self._max_batch_rows = max_batch_rows
        self._loop = asyncio.get_running_loop()
        self._pending: asyncio.Queue[_WriteUnit | None] = asyncio.Queue()
        self._first: collections.deque[_WriteUnit] = collections.deque()
        self._writer_task = asyncio.create_task(self._write_loop(), name="store-writer")
        self._closed = False
        self.commits = 0
        self.rows_written = 0
        # When the last transaction committed, and when one last failed (time.monotonic()).
        self._committed_at: float | None = None
        self._failed_at: float | None = None

    @property
    def waiting(self) -> int:
        # A unit submitted `first` is counted by its wake-up mark in the queue (which may
        # outlast it by a batch), not a second time from `_first`.
        return self._pending.qsize()

    def committed_lately(self, within_s: float) -> bool:
        """A transaction committed within the last `within_s` seconds and none failed since:
        the database takes writes, as a heartbeat's commit would show, known without waiting
        behind the writes under way."""
        committed_at, failed_at = self._committed_at, self._failed_at
        return (
            not self._closed
            and committed_at is not None
            and time.monotonic() - committed_at <= within_s
            and (failed_at is None or failed_at < committed_at)
        )

    async def write(self, *statements: Statement, first: bool = False) -> None:
        """Commit `statements` as one unit (with `first`, in the next transaction, ahead of
        the units waiting). Once submitted, the write happens even if the caller is cancelled
        (the writer task owns it)."""
        # A cancelled caller cancels only this future; the writer still commits the unit
        # (and skips the result of a future already done).
        await self.submit(*statements, first=first)

    def submit(self, *statements: Statement, first: bool = False) -> asyncio.Future[None]:
        """Hand `statements` to the writer as one unit, now; the future is done when they are
        committed (or failed). Raises StoreClosed after close()."""
        if self._closed:
            raise StoreClosed("the database is closed (the server is shutting down)")
        unit = _WriteUnit(list(statements), self._loop.create_future())
        if first:
            self._first.append(unit)
            self._pending.put_nowait(_FIRST)
        else:
            self._pending.put_nowait(unit)
        return unit.done

    async def close(self) -> None:
        """Commit every unit already submitted, then close the connection."""
        self._closed = True
        await self._pending.put(None)
        await self._writer_task
        await self._writer_db.close()

    async def _write_loop(self) -> None:
        while True:
            unit = _FIRST if self._first else await self._pending.get()
            if self._first:  # ahead of every unit waiting, the one just taken included
                await self._commit_first()
            if unit is _FIRST:
                continue  # its unit was committed just now, or before
            stop = unit is None
            batch = [] if unit is None else [unit]
            rows = len(batch[0].statements) if batch else 0
            while not stop and rows < self._max_batch_rows and not self._pending.empty():
                more = self._pending.get_nowait()
                if more is None:
                    stop = True
                elif more is not _FIRST:  # its unit goes next, in a transaction of its own
                    batch.append(more)
                    rows += len(more.statements)
            if batch:
                await self._commit_batch(batch)
            if stop:
                if self._first:
                    await self._commit_first()
                return

    async def _commit_first(self) -> None:
        """The units submitted `first`, ahead of every unit waiting, in a transaction of their
        own: a health probe asks whether the database commits now. At the head of a full
        batch it also waited for hundreds of rows to be written (/health during a flood over
        one connection: p50 144 ms with batches of 512 rows)."""
        batch = list(self._first)
        self._first.clear()
        await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[_WriteUnit]) -> None:
        try:
            await self._run_transaction([s for unit in batch for s in unit.statements])
        except Exception as exc:
            if len(batch) == 1 or _refused_by_database(exc):
                for unit in batch:
                    if not unit.done.done():
                        unit.done.set_exception(exc)
                return
            # One bad unit must not fail its neighbours: each half is tried on its own, and
            # a half that fails is halved again, down to the unit that fails. So one bad unit
            # costs about two transactions per halving (18 for 512 units) rather than one
            # per unit, each with its fsync, while the rest of the writes wait. The halves
            # keep the batch's order.
            middle = len(batch) // 2
            await self._commit_batch(batch[:middle])
            await self._commit_batch(batch[middle:])
            return
        for unit in batch:
            if not unit.done.done():
                unit.done.set_result(None)

    async def _run_transaction(self, statements: list[Statement]) -> None:
        # The whole transaction in one trip to the connection's thread. Each aiosqlite call
        # is a trip of its own, and its answer waits for the event loop to come round: with
        # intake keeping the loop busy, BEGIN, the inserts and COMMIT as three calls took
        # 15 + 12 + 2 ms per batch of 128 rows (one connection of pipelined small requests),
        # and the writer, one transaction at a time, capped intake near 4,400 requests/s.
        # aiosqlite has no public call that runs several statements with parameters in one
        # trip; `_execute` is the one its own public calls use (the version is pinned, and
        # every test that stores anything goes through here).
        try:
            await self._writer_db._execute(_transaction, self._writer_db._conn, statements)
        except Exception as exc:
            self._failed_at = time.monotonic()
            log.warning("write transaction of %d statements failed: %s", len(statements), exc)
            raise
        self._committed_at = time.monotonic()
        self.commits += 1
        self.rows_written += len(statements)


def _transaction(connection: sqlite3.Connection, statements: list[Statement]) -> None:
    """Commit `statements` as one transaction, or roll it back and raise. Runs in the
    connection's thread."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in _runs(statements):
            _execute_run(connection, sql, rows)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _runs(statements: list[Statement]) -> list[tuple[str, list[Sequence[Any]]]]:
    """The statements as runs of one statement text, each run's parameters in order: the
    consecutive runs. When every statement inserts one row (a burst of new requests, each
    with its mirror record), the rows of each table are taken together instead, in their own
    order: nothing else in the transaction reads them, and each table's rows keep their
    order (with no triggers or foreign keys in the schema, that is all the order decides)."""
    inserts = [_single_row_insert(sql) for sql, _ in statements]
    ordered = statements
    if all(inserts):
        by_table: dict[str, list[Statement]] = {}
        for statement, insert in zip(statements, inserts, strict=True):
            assert insert is not None
            by_table.setdefault(insert.table, []).append(statement)
        ordered = [statement for table in by_table.values() for statement in table]
    runs: list[tuple[str, list[Sequence[Any]]]] = []
    for sql, params in ordered:
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params]))
    return runs


def _execute_run(connection: sqlite3.Connection, sql: str, rows: list[Sequence[Any]]) -> None:
    """A run of one statement. An INSERT of one row of values is made one INSERT of many rows:
    the sqlite3 module lets go of the GIL for every statement it steps, and then has to wait
    for it again, up to the interpreter's switch interval (5 ms) while the event loop's thread
    is busy. Beside a busy thread, 128 single-row inserts took 200 ms that way and one
    128-row insert 15 ms (1 ms either way beside an idle one)."""
    insert = _single_row_insert(sql)
    if insert is None or len(rows) == 1 or isinstance(rows[0], dict):
        connection.executemany(sql, rows)
        return
    # Chunks of a power of two rows: a handful of statement texts, each prepared once.
    per_row = max(1, len(rows[0]))
    cap = max(1, min(MAX_ROWS_PER_INSERT, connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // per_row))
    start = 0
    while start < len(rows):
        size = 1 << (min(cap, len(rows) - start).bit_length() - 1)
        chunk = rows[start : start + size]
        if size == 1:
            connection.execute(sql, chunk[0])
        else:
            connection.execute(_many_rows(sql, insert.values, size), [value for row in chunk for value in row])
        start += size


# Rows per multi-row INSERT (also held under SQLite's limit on parameters per statement).
MAX_ROWS_PER_INSERT = 128
# `INSERT INTO <table> (...) VALUES (...)`, nothing after, its values plain `?` placeholders,
# numbers, quoted strings or NULL: the form whose VALUES can be repeated (a named or numbered
# placeholder would bind one row's value in every row).
_VALUE = r"(?:\?|-?\d+(?:\.\d+)?|'[^']*'|NULL)"
_SINGLE_ROW_INSERT = re.compile(
    rf"^\s*INSERT\s+INTO\s+(\w+)\b[^;]*\bVALUES\s*(\(\s*{_VALUE}(?:\s*,\s*{_VALUE})*\s*\))\s*$",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class _SingleRowInsert:
    table: str
    values: str  # the `(...)` after VALUES


@functools.lru_cache(maxsize=256)
def _single_row_insert(sql: str) -> _SingleRowInsert | None:
    """What an INSERT of one row of values inserts into, None for any other statement."""
    match = _SINGLE_ROW_INSERT.match(sql)
    return _SingleRowInsert(match.group(1).lower(), match.group(2)) if match else None


@functools.lru_cache(maxsize=256)
def _many_rows(sql: str, values: str, rows: int) -> str:
    return sql.rstrip() + f", {values}" * (rows - 1)


def _refused_by_database(exc: Exception) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in REFUSED_BY_DATABASE
