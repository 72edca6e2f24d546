"""The request table as it is read: pages of the queue at start-up, finals owed to a
service, a request by id or idempotency key, recent requests for the status page, payloads
read back at dispatch. All on the store's reader connection, which never sees a half-done
write transaction. A row that cannot be read back is set aside (ended) through the store's
writes, so it never stops a start-up, a page or the queue."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiosqlite

from app.domain import json_text
from app.domain.jobs import ExecutorType, GenType, Job
from app.storage.payload_files import PayloadFiles, PayloadUnreadable
from app.storage.request_rows import (
    HEADER_COLUMNS,
    OBJECT_ID_INDEX,
    PAYLOAD_FILE_INDEX,
    PAYLOAD_IN_DATABASE_SQL,
    PAYLOAD_SQL,
    SEQ_INDEX,
    job_from_row,
    no_cycle_collection,
)

log = logging.getLogger(__name__)

# Queued rows; the `status IN (...)` term lets SQLite use the partial index of pending rows
# (a bare `status = 'queued'` scans the whole table).
QUEUED_ROWS_SQL = "status IN ('queued', 'generating') AND status = 'queued'"


@dataclass
class BacklogSummary:
    """Queued requests in the database: how many per (executor type, premium) and per
    (service, user_id)."""

    by_line: dict[tuple[ExecutorType, bool], int] = field(default_factory=dict)
    by_user: dict[tuple[str, Any], int] = field(default_factory=dict)
    # The newest request stored when it was made: the backlog is what came up to here.
    last_seq: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_line.values())


class RequestReads:
    """Reads on the store's reader connection; `write` is the store's group commit (used only
    to set an unreadable row aside)."""

    def __init__(
        self, reader_db: aiosqlite.Connection, write: Callable[..., Awaitable[None]], payload_files: PayloadFiles
    ) -> None:
        self._reader_db = reader_db
        self._write = write
        self._payload_files = payload_files
        self._set_aside_ids: set[str] = set()

    async def fetch_jobs(
        self, where: str, params: Sequence[Any] = (), *, order: str = "seq", limit: int = -1, with_payload: bool = True
    ) -> list[Job]:
        """The matching requests; without `with_payload`, their payload is left in the
        database (None, read back with load_payload). A row that cannot be read back (say,
        JSON nested deeper than the parser's stack allows, stored by an earlier release) is
        left out and set aside."""
        jobs, _ = await self._fetch_rows(where, params, order=order, limit=limit, with_payload=with_payload)
        return jobs

    async def _fetch_rows(
        self, where: str, params: Sequence[Any], *, order: str, limit: int, with_payload: bool
    ) -> tuple[list[Job], list[tuple[Any, ...]]]:
        """_fetch_jobs, also returning the rows read (unreadable ones included)."""
        jobs, unreadable = [], []
        columns = f"{HEADER_COLUMNS}, {PAYLOAD_SQL} AS payload" if with_payload else HEADER_COLUMNS
        async with self._reader_db.execute(
            f"SELECT {columns} FROM requests WHERE {where} ORDER BY {order} LIMIT ?", (*params, limit)
        ) as cursor:
            cursor.row_factory = None  # plain tuples: job_from_row reads by position
            # One hop to the database thread for all rows: iterating the cursor would hop per
            # 64 rows, which dominated rebuilding a queue of 100,000.
            rows = cast("list[tuple[Any, ...]]", await cursor.fetchall())  # row_factory None: tuples
            with no_cycle_collection():
                for row in rows:
                    try:
                        jobs.append(job_from_row(row, with_payload))
                    except (ValueError, TypeError, KeyError, RecursionError) as exc:
                        unreadable.append((row[OBJECT_ID_INDEX], f"{type(exc).__name__}: {exc}"[:200]))
        for object_id, reason in unreadable:
            await self._set_aside(object_id, reason)
        if with_payload:
            await self._read_payload_files(jobs, rows)
        return jobs, rows

    async def _read_payload_files(self, jobs: list[Job], rows: list[tuple[Any, ...]]) -> None:
        """Fill in the payloads kept in files. One that cannot be read is left None: the job is
        still listed (a final can be answered without it), and dispatch reports it."""
        in_file = {row[OBJECT_ID_INDEX] for row in rows if row[PAYLOAD_FILE_INDEX]}
        for job in jobs:
            if job.object_id in in_file:
                try:
                    job.payload = await self._payload_files.read(job.object_id)
                except PayloadUnreadable as exc:
                    log.warning("%s: %s", job.object_id, exc)

    async def ids_with_payload_files(self) -> list[str]:
        async with self._reader_db.execute("SELECT object_id FROM requests WHERE payload_file = 1") as cursor:
            return [row[0] async for row in cursor]

    async def _set_aside(self, object_id: str, reason: str) -> None:
        """End a request whose row cannot be read back, so it never stops start-up, a page or
        the queue. Its answer cannot be built (its own fields are what is unreadable): it is
        marked delivered. Logged once per process."""
        if object_id in self._set_aside_ids:
            return
        self._set_aside_ids.add(object_id)
        log.error(
            "%s cannot be read back from the database (%s); it is ended with an error and left out from now on",
            object_id,
            reason,
        )
        result = json_text.dumps(
            {"content_type": "text", "content": f"the stored request cannot be read back: {reason}"}
        )
        now = time.time()
        try:
            await self._write(
                (
                    "UPDATE requests SET status = 'error', result = ?, finished_at = ?,"
                    " delivered_at = ?, revision = revision + 1 WHERE object_id = ?"
                    " AND status IN ('queued', 'generating')",
                    (result, now, now, object_id),
                )
            )
        except Exception as exc:
            log.warning("%s: setting it aside failed: %s", object_id, exc)

    async def backlog_summary(self) -> BacklogSummary:
        """What start-up needs before the queued requests are read back page by page: how many
        wait per executor type and class, and per service and user (the limits count them from
        the first moment)."""
        summary = BacklogSummary()
        async with self._reader_db.execute("SELECT coalesce(max(seq), 0) FROM requests") as cursor:
            row = await cursor.fetchone()
            summary.last_seq = row[0] if row else 0
        pending = f"{QUEUED_ROWS_SQL} AND seq <= ?"
        async with self._reader_db.execute(
            f"SELECT executor, premium, count(*) FROM requests WHERE {pending} GROUP BY 1, 2", (summary.last_seq,)
        ) as cursor:
            for executor, premium, count in await cursor.fetchall():
                summary.by_line[ExecutorType(executor), bool(premium)] = count
        # Counted here rather than by GROUP BY: SQLite sorts 100,000 distinct users slower than
        # a dict counts them.
        async with self._reader_db.execute(
            # A row whose service_info is not JSON is set aside when its page is read.
            "SELECT service, CASE WHEN json_valid(service_info) THEN json_extract(service_info, '$.user_id') END"
            f" FROM requests WHERE {pending}",
            (summary.last_seq,),
        ) as cursor:
            cursor.row_factory = None  # (service, user_id) tuples are the keys
            summary.by_user = collections.Counter(cast("list[tuple[str, Any]]", await cursor.fetchall()))
        return summary

    async def queued_page(self, after_seq: int, last_seq: int, limit: int) -> tuple[list[Job], int | None]:
        """The next `limit` queued requests after `after_seq` up to `last_seq`, oldest first,
        without their payloads (a backlog of megabyte images is not read into memory to rebuild
        the queue), and the seq to read on from (None: this was the last page). Rows of earlier
        releases that lack a stored cost get their payload read once, to be costed."""
        jobs, rows = await self._fetch_rows(
            f"{QUEUED_ROWS_SQL} AND seq > ? AND seq <= ?",
            (after_seq, last_seq),
            order="seq",
            limit=limit,
            with_payload=False,
        )
        for job in jobs:
            if job.cost_units == 0.0:
                job.payload = await self.load_payload(job.object_id)
                job.payload_chars = len(json_text.dumps(job.payload))
        return jobs, (rows[-1][SEQ_INDEX] if len(rows) == limit else None)

    async def owed_finals(self, service: str) -> list[Job]:
        """Finished requests of `service` whose final message is still owed to a connection:
        never sent, or (with require_ack) sent and not acknowledged. Oldest first."""
        return await self.fetch_jobs(
            "service = ? AND channel = 'ws' AND status IN ('ok', 'error')"
            " AND (delivered_at IS NULL OR (ack_required = 1 AND acked_at IS NULL)) AND pruned_at IS NULL",
            (service,),
        )

    async def find_by_request_key(self, service: str, request_key: str) -> Job | None:
        """The request of `service` that carried this idempotency key, if any."""
        jobs = await self.fetch_jobs("service = ? AND request_key = ?", (service, request_key))
        return jobs[0] if jobs else None

    async def recent_jobs(self, limit: int) -> list[Job]:
        """The latest `limit` requests, newest first, without their payloads (a page of
        recent img2img requests would otherwise read megabytes per poll)."""
        return await self.fetch_jobs("1", order="created_at DESC", limit=limit, with_payload=False)

    async def prompts_of(self, object_ids: Sequence[str], max_chars: int) -> dict[str, str]:
        """The first `max_chars` of each request's `prompt` (text2img's, or img2img's beside its
        images), for the status page's detailed view."""
        if not object_ids:
            return {}
        marks = ", ".join("?" * len(object_ids))
        async with self._reader_db.execute(
            f"SELECT object_id, substr(json_extract({PAYLOAD_IN_DATABASE_SQL}, '$.prompt'), 1, ?) FROM requests"
            f" WHERE object_id IN ({marks})",
            (max_chars, *object_ids),
        ) as cursor:
            return {row[0]: row[1] async for row in cursor if isinstance(row[1], str)}

    async def load_payload(self, object_id: str) -> dict[str, Any]:
        """The payload of a committed request, as sent. Raises KeyError for an unknown request,
        PayloadUnreadable when its file is missing or damaged."""
        async with self._reader_db.execute(
            f"SELECT payload_file, {PAYLOAD_SQL} FROM requests WHERE object_id = ?", (object_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise KeyError(f"no request {object_id} in the database")
        if row[0]:
            return await self._payload_files.read(object_id)
        return json_text.loads(row[1])

    async def get(self, object_id: str) -> Job | None:
        jobs = await self.fetch_jobs("object_id = ?", (object_id,))
        return jobs[0] if jobs else None

    async def recent_successes(self, backend_name: str, limit: int) -> list[tuple[float | None, GenType, Any, float]]:
        """(cost units, gen_type, payload, generation seconds) of the backend's latest `limit`
        successful jobs, oldest first: what its learned speed is rebuilt from after a restart.
        The payload is read only for rows of releases that did not store the cost (None
        otherwise), and rows pruned before their cost was stored are left out."""
        async with self._reader_db.execute(
            f"SELECT cost_units, gen_type, CASE WHEN cost_units IS NULL THEN {PAYLOAD_SQL} END, generation_s"
            " FROM requests WHERE status = 'ok' AND backend = ? AND generation_s IS NOT NULL"
            " AND (cost_units IS NOT NULL OR pruned_at IS NULL) ORDER BY finished_at DESC LIMIT ?",
            (backend_name, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        successes = []
        for cost_units, gen_type, payload, seconds in list(rows)[::-1]:
            try:
                successes.append(
                    (cost_units, GenType(gen_type), None if payload is None else json_text.loads(payload), seconds)
                )
            except (ValueError, RecursionError):
                continue  # unreadable rows are set aside where they are fetched whole
        return successes
