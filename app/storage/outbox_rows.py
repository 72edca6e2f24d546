"""The outbox table, as the mirrors see it: the work waiting for each mirror (MongoDB, S3),
read in order and deleted once carried out. The store writes the work in the same transaction
as the change it mirrors (Store._commit_change), so a crash loses none of it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from app.domain import json_text
from app.storage.group_commit import Statement

# The outbox document that deletes a request's record from the MongoDB mirror.
DELETED_RECORD = {"deleted": True}
INSERT_INTO_OUTBOX = "INSERT INTO outbox (target, object_id, revision, document, created_at)"
OUTBOX_INSERT = f"{INSERT_INTO_OUTBOX} VALUES (?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class OutboxItem:
    id: int
    object_id: str
    revision: int
    document: dict[str, Any]
    attempts: int


class OutboxRows:
    """Reads on the store's reader connection; writes through its group commit (`write`)."""

    def __init__(self, reader_db: aiosqlite.Connection, write: Callable[..., Awaitable[None]]) -> None:
        self._reader_db = reader_db
        self._write = write

    async def batch(self, target: str, limit: int) -> list[OutboxItem]:
        """The oldest `limit` pieces of work for one mirror, in order."""
        async with self._reader_db.execute(
            "SELECT id, object_id, revision, document, attempts FROM outbox WHERE target = ? ORDER BY id LIMIT ?",
            (target, limit),
        ) as cursor:
            return [OutboxItem(row[0], row[1], row[2], json_text.loads(row[3]), row[4]) async for row in cursor]

    async def count(self, target: str) -> int:
        async with self._reader_db.execute("SELECT count(*) FROM outbox WHERE target = ?", (target,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row is not None else 0

    async def done(self, ids: Sequence[int]) -> None:
        statements: list[Statement] = [("DELETE FROM outbox WHERE id = ?", (row_id,)) for row_id in ids]
        await self._write(*statements)

    async def failed(self, row_id: int, reason: str) -> None:
        await self._write(
            ("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (reason[:500], row_id))
        )
