"""The rows retention works on (app/storage/retention.py runs it): finished requests old
enough to be pruned, pruning them to a summary (payload gone, image result replaced by a
text), and forgetting old summaries. With the MongoDB mirror on, each change writes the
mirror's work in the same transaction, as every store change does (Store._commit_change)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import aiosqlite

from app.domain import json_text
from app.storage.group_commit import Statement
from app.storage.outbox_rows import DELETED_RECORD, INSERT_INTO_OUTBOX, OUTBOX_INSERT
from app.storage.payload_files import PayloadFiles


class RetentionRows:
    """Reads on the store's reader connection; writes through its group commit (`write`)."""

    def __init__(
        self,
        reader_db: aiosqlite.Connection,
        write: Callable[..., Awaitable[None]],
        payload_files: PayloadFiles,
        *,
        mirrored: bool,
        wake_mirror: Callable[[str], None],
    ) -> None:
        self._reader_db = reader_db
        self._write = write
        self._payload_files = payload_files
        self._mirrored = mirrored  # the MongoDB mirror is on
        self._wake_mirror = wake_mirror

    async def prunable(
        self, finished_before: float, limit: int, max_payload_chars: int
    ) -> list[tuple[str, str | None]]:
        """(object_id, file_name of its image result or None) of finished requests not yet
        pruned that finished before `finished_before`, oldest first: up to `limit` of them,
        and no more payload than `max_payload_chars` in all (at least one)."""
        async with self._reader_db.execute(
            "SELECT object_id, json_extract(result, '$.file_name'), coalesce(payload_chars, length(payload))"
            " FROM requests WHERE status IN ('ok', 'error') AND pruned_at IS NULL AND finished_at < ?"
            " ORDER BY finished_at LIMIT ?",
            (finished_before, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        batch: list[tuple[str, str | None]] = []
        chars = 0
        for object_id, file_name, payload_chars in rows:
            chars += payload_chars or 0
            if batch and chars > max_payload_chars:
                break
            batch.append((object_id, file_name))
        return batch

    async def prune(self, object_ids: Sequence[str], summary: str) -> None:
        """Keep only the summary of these finished requests: the payload goes, and an image
        result becomes the text `summary` (an error's text is kept). One transaction; with the
        MongoDB mirror on, their records there are pruned the same way (a new revision)."""
        if not object_ids:
            return
        marks = ", ".join("?" * len(object_ids))
        now = time.time()
        statements: list[Statement] = [
            (
                "UPDATE requests SET payload = '{}', payload_chars = 2, payload_file = 0, pruned_at = ?,"
                " revision = revision + 1,"
                " result = CASE WHEN json_extract(result, '$.content_type') = 'text' THEN result ELSE ? END"
                f" WHERE object_id IN ({marks}) AND status IN ('ok', 'error')",
                (now, json_text.dumps({"content_type": "text", "content": summary}), *object_ids),
            ),
            (f"DELETE FROM payloads WHERE object_id IN ({marks})", tuple(object_ids)),
        ]
        if self._mirrored:
            statements.append(
                (
                    f"{INSERT_INTO_OUTBOX} SELECT 'mongodb', object_id, revision, json_object('object_id', object_id, 'revision',"
                    " revision, 'payload', json('{}'), 'result', json(result), 'pruned_at', pruned_at), ?"
                    f" FROM requests WHERE object_id IN ({marks}) AND pruned_at = ?",
                    (now, *object_ids, now),
                )
            )
        await self._write(*statements)
        # After the commit: a crash before this line leaves files the next start deletes.
        await self._payload_files.delete(object_ids)
        if self._mirrored:
            self._wake_mirror("mongodb")

    async def forget_summaries(self, finished_before: float, limit: int) -> int:
        """Delete up to `limit` pruned requests that finished before `finished_before`, oldest
        first (and, with the MongoDB mirror on, their records there). Returns how many."""
        async with self._reader_db.execute(
            "SELECT object_id, revision FROM requests WHERE pruned_at IS NOT NULL AND finished_at < ?"
            " ORDER BY finished_at LIMIT ?",
            (finished_before, limit),
        ) as cursor:
            rows = [(row[0], row[1]) async for row in cursor]
        if rows:
            marks = ", ".join("?" * len(rows))
            statements: list[Statement] = [
                (f"DELETE FROM requests WHERE object_id IN ({marks})", tuple(object_id for object_id, _ in rows))
            ]
            if self._mirrored:
                now = time.time()
                statements += [
                    (OUTBOX_INSERT, ("mongodb", object_id, revision + 1, json_text.dumps(DELETED_RECORD), now))
                    for object_id, revision in rows
                ]
            await self._write(*statements)
            if self._mirrored:
                self._wake_mirror("mongodb")
        return len(rows)
