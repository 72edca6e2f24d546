"""Group commit: many writers, one transaction.

Every write of the store is a unit of statements that must commit together. Units wait in a
queue; one writer task takes whatever has gathered (up to `max_batch_rows` statements) and
commits it in a single transaction, so one fsync (synchronous=FULL) serves many requests. A
unit that fails inside a batch does not fail its neighbours: the batch is retried unit by unit,
unless the database itself refused it (busy or locked by another process, read-only, full, an
I/O error: REFUSED_BY_DATABASE), which fails every unit of the batch at once, each with that
error: a unit alone would only wait out the same lock again. Once submitted, a unit is
committed even if its caller is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

# Rows per transaction (STORE_BATCH_ROWS). Past ~100 the commit no longer gets cheaper per
# row, and a bigger batch only makes the first waiter in it wait longer.
MAX_BATCH_ROWS = 128

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


@dataclass
class _WriteUnit:
    statements: list[Statement]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupWriter:
    """The one writer of a database connection. Use `write`, then `close`."""

    def __init__(self, db: aiosqlite.Connection, max_batch_rows: int) -> None:
        self._writer_db = db
        self._max_batch_rows = max_batch_rows
        self._pending: asyncio.Queue[_WriteUnit | None] = asyncio.Queue()
        self._writer_task = asyncio.create_task(self._write_loop(), name="store-writer")
        self._closed = False
        self.commits = 0
        self.rows_written = 0

    @property
    def waiting(self) -> int:
        return self._pending.qsize()

    async def write(self, *statements: Statement) -> None:
        """Commit `statements` as one unit. Once submitted, the write happens even if the
        caller is cancelled (the writer task owns it)."""
        # A cancelled caller cancels only this future; the writer still commits the unit
        # (and skips the result of a future already done).
        await self.submit(*statements)

    def submit(self, *statements: Statement) -> asyncio.Future[None]:
        """Hand `statements` to the writer as one unit, now; the future is done when they are
        committed (or failed). Raises StoreClosed after close()."""
        if self._closed:
            raise StoreClosed("the database is closed (the server is shutting down)")
        unit = _WriteUnit(list(statements))
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
            unit = await self._pending.get()
            if unit is None:
                return
            batch, rows, stop = [unit], len(unit.statements), False
            while rows < self._max_batch_rows and not self._pending.empty():
                more = self._pending.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.append(more)
                rows += len(more.statements)
            await self._commit_batch(batch)
            if stop:
                return

    async def _commit_batch(self, batch: list[_WriteUnit]) -> None:
        try:
            await self._run_transaction([s for unit in batch for s in unit.statements])
        except Exception as exc:
            if len(batch) == 1 or _refused_by_database(exc):
                for unit in batch:
                    if not unit.done.done():
                        unit.done.set_exception(exc)
                return
            # One bad unit must not fail its neighbours: retry each on its own.
            for unit in batch:
                await self._commit_batch([unit])
            return
        for unit in batch:
            if not unit.done.done():
                unit.done.set_result(None)

    async def _run_transaction(self, statements: list[Statement]) -> None:
        db = self._writer_db
        try:
            await db.execute("BEGIN IMMEDIATE")
            # Consecutive runs of one statement go in one executemany: one thread hop.
            start = 0
            while start < len(statements):
                sql = statements[start][0]
                end = start
                while end < len(statements) and statements[end][0] == sql:
                    end += 1
                await db.executemany(sql, [params for _, params in statements[start:end]])
                start = end
            await db.execute("COMMIT")
        except Exception as exc:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            log.warning("write transaction of %d statements failed: %s", len(statements), exc)
            raise
        self.commits += 1
        self.rows_written += len(statements)


def _refused_by_database(exc: Exception) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in REFUSED_BY_DATABASE
