"""SQLite, the source of truth for every request.

Durability: each write is committed (WAL, synchronous=FULL) before the awaiting caller
resumes, so a client never hears `queued` for a request a crash could lose.

Throughput: one writer task owns the write connection and commits whatever writes are
waiting in one transaction (group commit). A lone write costs one commit; a burst of a
hundred costs about the same. Reads use a second connection, so they never see a half-done
write transaction; they are in request_reads.py (`store.reads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from app.domain import json_text
from app.domain.jobs import LARGE_PAYLOAD_CHARS, Job, JobStatus
from app.storage.group_commit import MAX_BATCH_ROWS, GroupWriter, Statement
from app.storage.migrations import apply_migrations
from app.storage.outbox_rows import OUTBOX_INSERT, OutboxRows
from app.storage.payload_files import PayloadFiles, outline
from app.storage.request_reads import RequestReads
from app.storage.retention_rows import RetentionRows

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
# A health check is answered from a transaction committed this recently (check_writable).
RECENT_COMMIT_S = 1.0

RecordBuilder = Callable[[Job], dict[str, Any]]


# What the store's writes change on a Job. A failed write puts them back, so the caller may
# simply make the same call again (the scheduler retries claims and finishes until they land).
_PERSISTED_FIELDS = (
    "attempts",
    "interruptions",
    "status",
    "backend",
    "result",
    "started_at",
    "finished_at",
    "last_error",
    "generation_s",
    "delivered_at",
    "acked_at",
    "revision",
)


@contextlib.contextmanager
def _unchanged_on_failure(job: Job) -> Iterator[None]:
    saved = {name: getattr(job, name) for name in _PERSISTED_FIELDS}
    try:
        yield
    except BaseException:
        for name, value in saved.items():
            setattr(job, name, value)
        raise


async def connect(path: Path, *, read_only: bool = False) -> aiosqlite.Connection:
    """Open a connection with the pragmas every connection here needs."""
    db = await aiosqlite.connect(path, isolation_level=None)  # transactions are explicit
    db.row_factory = aiosqlite.Row
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await db.execute("PRAGMA foreign_keys = ON")
    if read_only:
        await db.execute("PRAGMA query_only = ON")
    else:
        await db.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit survives power loss, not just a process crash. Group commit keeps
        # the fsync cost per request small.
        await db.execute("PRAGMA synchronous = FULL")
    return db


class Store:
    """The request table. Use `await Store.open(path)`, then `await store.close()`."""

    def __init__(
        self,
        writer_db: aiosqlite.Connection,
        reader_db: aiosqlite.Connection,
        payload_files: PayloadFiles,
        max_batch_rows: int,
        record_of: RecordBuilder | None,
    ) -> None:
        # The MongoDB mirror's document of a request (None: no MongoDB mirror). Given by the
        # caller, so the store knows no mirror's format.
        self._record_of = record_of
        # Called after mirror work for that target is committed (the mirror's worker wakes).
        self.outbox_listeners: dict[str, Callable[[], None]] = {}
        self._writer = GroupWriter(writer_db, max_batch_rows)
        self._reader_db = reader_db
        # What the mirrors read and clear (their work is written with each change, below).
        self.outbox = OutboxRows(reader_db, self._write)
        self._payload_files = payload_files
        # Every read of the request table (app/storage/request_reads.py).
        self.reads = RequestReads(reader_db, self._write, payload_files)
        # What retention reads and prunes (app/storage/retention.py runs it).
        self.retention = RetentionRows(
            reader_db, self._write, payload_files, mirrored=record_of is not None, wake_mirror=self._wake_mirror
        )

    @classmethod
    async def open(
        cls, path: Path, *, max_batch_rows: int = MAX_BATCH_ROWS, record_of: RecordBuilder | None = None
    ) -> Store:
        """Open (creating if needed) and migrate the database at `path`, and delete the payload
        files a crash left without a request. With `record_of`, every status change also
        queues the request's record (`record_of(job)`) for MongoDB."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload_files = PayloadFiles.beside(path)
        writer_db = await connect(path)
        try:
            await apply_migrations(writer_db)
            payload_files.create_folder()
        except Exception:
            await writer_db.close()
            raise
        reader_db = await connect(path, read_only=True)
        store = cls(writer_db, reader_db, payload_files, max_batch_rows, record_of)
        try:
            await payload_files.sweep(await store.reads.ids_with_payload_files())
        except Exception:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Commit every write already submitted, then close both connections."""
        await self._writer.close()
        await self._reader_db.close()

    @property
    def commits(self) -> int:
        return self._writer.commits

    def __repr__(self) -> str:
        writer = self._writer
        return f"<Store commits={writer.commits} rows={writer.rows_written} waiting={writer.waiting}>"

    # -- writes -------------------------------------------------------------------------

    async def _write(self, *statements: Statement, first: bool = False) -> None:
        """Commit `statements` as one unit (group commit: app/storage/group_commit.py); with
        `first`, ahead of the units already waiting. Raises StoreClosed after close()."""
        await self._writer.write(*statements, first=first)

    async def _commit_change(self, job: Job, *statements: Statement, upload: dict[str, Any] | None = None) -> None:
        """Commit a change of `job` (its revision already bumped) together with its mirror
        work: the new version of its record for MongoDB, and an S3 upload if given."""
        await self._submit_change(job, *statements, upload=upload)

    def _submit_change(
        self, job: Job, *statements: Statement, upload: dict[str, Any] | None = None
    ) -> asyncio.Future[None]:
        """_commit_change, handed to the writer now; the future is done when the change is
        committed (and the mirrors are woken then). A future rather than a coroutine: whoever
        holds it can tell whether awaiting it would wait (Intake.accept_together)."""
        statements_ = list(statements)
        now = time.time()
        if self._record_of is not None:
            statements_.append(
                (OUTBOX_INSERT, ("mongodb", job.object_id, job.revision, json_text.dumps(self._record_of(job)), now))
            )
        if upload is not None:
            statements_.append((OUTBOX_INSERT, ("s3", job.object_id, job.revision, json_text.dumps(upload), now)))
        done = self._writer.submit(*statements_)
        if self._record_of is not None or upload is not None:
            done.add_done_callback(functools.partial(self._wake_mirrors, upload is not None))
        return done

    def _wake_mirrors(self, upload: bool, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # not committed: nothing new in the outbox
        if self._record_of is not None:
            self._wake_mirror("mongodb")
        if upload:
            self._wake_mirror("s3")

    def _wake_mirror(self, target: str) -> None:
        listener = self.outbox_listeners.get(target)
        if listener is not None:
            listener()

    # Every write below is safe to repeat after it failed: a failed write leaves `job` as it
    # was (_unchanged_on_failure), so the same call makes the same change.

    async def add(self, job: Job) -> None:
        """Commit a new queued request. Raises sqlite3.IntegrityError on a duplicate id or a
        duplicate request_key of the same service."""
        await self.submit_add(job)

    def submit_add(self, job: Job) -> asyncio.Future[None] | Coroutine[Any, Any, None]:
        """`add`, with the commit of a payload that stays in its row handed to the writer now:
        what it returns (a future, done when the request is committed) raises as `add` does.
        Intake hands over the requests that arrive together before it awaits any
        (Intake.accept_together). A payload kept in a file (LARGE_PAYLOAD_CHARS) is written
        first, by the coroutine returned then, when it is awaited."""
        job.revision = 1  # a new request's first revision
        if _json_bytes_at_least(job.payload) >= LARGE_PAYLOAD_CHARS:
            return self._add_with_payload_file(job)
        payload_json = json_text.dumps_bytes(job.payload)
        job.payload_chars = len(payload_json)
        if job.has_large_payload:  # large without one long string (many fields, non-ASCII text)
            return self._add_with_payload_file(job, payload_json)
        return self._submit_change(job, self._insert(job, payload_json.decode(), in_file=False))

    async def _add_with_payload_file(self, job: Job, payload_json: bytes | None = None) -> None:
        # On disk before the row that says it is there (payload_files.py). Serialized by the
        # file's writer thread unless it already was: megabytes of JSON are no work for the
        # event loop.
        job.payload_chars = await self._payload_files.write(job.object_id, job.payload, payload_json)
        try:
            await self._commit_change(job, self._insert(job, json_text.dumps(outline(job.payload)), in_file=True))
        except Exception:
            # Not committed (a cancelled caller's unit is still committed: that is no Exception).
            await self._payload_files.delete([job.object_id])
            raise

    @staticmethod
    def _insert(job: Job, stored_payload: str, in_file: bool) -> Statement:
        return (
            "INSERT INTO requests (object_id, service, executor, gen_type, premium, settings,"
            " service_info, payload, status, created_at, revision, channel, ack_required, request_key,"
            " cost_units, payload_chars, payload_file)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.object_id,
                job.service,
                job.executor.value,
                job.gen_type.value,
                int(job.premium),
                json_text.dumps(job.settings),
                json_text.dumps(job.service_info),
                stored_payload,
                job.created_at,
                job.revision,
                job.channel,
                int(job.ack_required),
                job.request_key,
                job.cost_units or None,
                job.payload_chars,
                int(in_file),
            ),
        )

    async def claim(self, job: Job, backend_name: str) -> None:
        """Record that `backend_name` starts `job`; counts the attempt (also on `job`)."""
        with _unchanged_on_failure(job):
            job.attempts += 1
            job.status = JobStatus.GENERATING
            job.backend = backend_name
            job.started_at = time.time()
            job.revision += 1
            await self._commit_change(
                job,
                (
                    "UPDATE requests SET status = 'generating', attempts = ?, backend = ?, started_at = ?,"
                    " revision = ? WHERE object_id = ?",
                    (job.attempts, backend_name, job.started_at, job.revision, job.object_id),
                ),
            )

    async def requeue(self, job: Job, reason: str) -> None:
        """Put a job whose attempt failed back in line (its attempt stays counted)."""
        with _unchanged_on_failure(job):
            job.status = JobStatus.QUEUED
            job.last_error = reason
            job.revision += 1
            await self._commit_change(
                job,
                (
                    "UPDATE requests SET status = 'queued', last_error = ?, revision = ? WHERE object_id = ?",
                    (reason, job.revision, job.object_id),
                ),
            )

    async def finish(self, job: Job, generation_s: float | None, upload: dict[str, Any] | None = None) -> None:
        """Commit the final status and result already set on `job`, marked undelivered, with
        the S3 upload it needs (`upload`: an outbox document) in the same transaction."""
        assert job.status.is_final and job.result is not None
        with _unchanged_on_failure(job):
            job.finished_at = time.time()
            job.generation_s = generation_s
            job.revision += 1
            await self._commit_change(
                job,
                (
                    "UPDATE requests SET status = ?, result = ?, finished_at = ?, generation_s = ?,"
                    " delivered_at = NULL, revision = ? WHERE object_id = ?",
                    (
                        job.status.value,
                        json_text.dumps(job.result),
                        job.finished_at,
                        generation_s,
                        job.revision,
                        job.object_id,
                    ),
                ),
                upload=upload,
            )

    async def replace_result(self, job: Job) -> None:
        """Commit a changed result of a finished job (a fallback for a slow S3 upload)."""
        with _unchanged_on_failure(job):
            job.revision += 1
            await self._commit_change(
                job,
                (
                    "UPDATE requests SET result = ?, revision = ? WHERE object_id = ?",
                    (json_text.dumps(job.result), job.revision, job.object_id),
                ),
            )

    async def mark_delivered(self, jobs: Sequence[Job]) -> None:
        """Record that the final messages of `jobs` were sent. Safe to call twice."""
        now = time.time()
        await asyncio.gather(
            *[self._mark(job, "delivered_at", now) for job in jobs if job.delivered_at is None]
        )  # submitted together: one group commit

    async def mark_acked(self, job: Job) -> None:
        """Record that the client acknowledged the final message of `job`. Safe to call twice."""
        if job.acked_at is None:
            await self._mark(job, "acked_at", time.time())

    async def _mark(self, job: Job, column: str, now: float) -> None:
        with _unchanged_on_failure(job):
            setattr(job, column, now)
            job.revision += 1
            await self._commit_change(
                job,
                (
                    f"UPDATE requests SET {column} = ?, revision = ? WHERE object_id = ? AND {column} IS NULL",
                    (now, job.revision, job.object_id),
                ),
            )

    async def check_writable(self, timeout_s: float) -> None:
        """Returns when the database takes writes: at once when a transaction committed within
        RECENT_COMMIT_S and none failed since, else once a heartbeat row is committed, within
        `timeout_s`. Raises if it takes no writes. The heartbeat goes ahead of the writes
        waiting: what it asks is whether the database commits now, not how many requests a
        burst left to write. Even so, in a flood it waited for the transaction under way, of
        up to STORE_BATCH_ROWS rows: /health took 100-140 ms of its 150-200 ms there (10,000
        pipelined requests over one connection, batches of 512)."""
        if self._writer.committed_lately(RECENT_COMMIT_S):
            return
        async with asyncio.timeout(timeout_s):
            await self._write(
                (
                    "INSERT INTO heartbeat (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                    (time.time(),),
                ),
                first=True,
            )

    async def requeue_interrupted(self) -> int:
        """Put every request a previous run left `generating` back to `queued` (at start-up,
        before any backend runs: in a single process those rows are all orphaned). The
        interrupted attempt is not held against the request: it is counted as an
        interruption instead."""
        interrupted = await self.reads.fetch_jobs("status = 'generating'")
        for job in interrupted:
            job.status = JobStatus.QUEUED
            job.attempts = max(0, job.attempts - 1)
            job.interruptions += 1
            job.last_error = "interrupted by a restart of the balancer"
            job.revision += 1
            await self._commit_change(
                job,
                (
                    "UPDATE requests SET status = 'queued', attempts = ?, interruptions = ?, last_error = ?,"
                    " revision = ? WHERE object_id = ?",
                    (job.attempts, job.interruptions, job.last_error, job.revision, job.object_id),
                ),
            )
        return len(interrupted)


def _json_bytes_at_least(payload: Any) -> int:
    """A lower bound of the size of `payload` as JSON, in bytes, from the length of its strings
    and of those in its lists (a character is at least one byte, and escaping only adds): tells
    a payload that is large (an image) without serializing it on the event loop."""
    if not isinstance(payload, dict):
        return 0
    size = 0
    for value in payload.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, list):
            size += sum(len(item) for item in value if isinstance(item, str))
    return size
