"""A request's last steps, each request in a task of its own so its backend takes its next job
meanwhile: the outcome settled (image checked and stored, an S3 upload put in the outbox,
app/engine/outcome.py), the final state committed (retrying while the database refuses
writes), the request let go (its limits' counts, the scheduler's record of it), then its final
answer handed to delivery.

The final is reserved for this task's delivery before its commit: a connection opening in
between would otherwise also be sent it from the backlog of undelivered finals.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.domain.jobs import ExecutorType, JobStatus
from app.domain.lifecycle import Phase, TrackedRequest
from app.engine.admission import Admission
from app.engine.listener import JobListener
from app.engine.outcome import Outcomes
from app.engine.pool import ExecutorPool
from app.engine.recording import Recording
from app.metrics import Metrics
from app.storage.store import Store

log = logging.getLogger(__name__)


class Finishing:
    def __init__(
        self,
        store: Store,
        outcomes: Outcomes,
        listener: JobListener,
        recording: Recording,
        metrics: Metrics,
        admission: Admission,
        pools: dict[ExecutorType, ExecutorPool],
        tracked: dict[str, TrackedRequest],
    ) -> None:
        self._store = store
        self._outcomes = outcomes
        self._listener = listener
        self._recording = recording
        self._metrics = metrics
        self._admission = admission
        self._pools = pools
        self._tracked = tracked  # the scheduler's record of every request it holds
        self._tasks: set[asyncio.Task[None]] = set()
        self.finished = 0

    def begin(
        self,
        tracked: TrackedRequest,
        jpeg: bytes | None,
        failure: str,
        seconds: float | None,
        *,
        cancelled: bool = False,
    ) -> None:
        """Finish `tracked` with `jpeg` (its image) or `failure` (why not), unless it is
        finishing already."""
        if not tracked.begin_finish(cancelled=cancelled):
            return
        task = asyncio.create_task(self._finish(tracked, jpeg, failure, seconds), name=f"finish-{tracked.object_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout_s: float) -> None:
        """Give the requests finishing `timeout_s` to be done, then cancel them (shutdown). A
        finishing request is committed before it waits on anything (a sync S3 upload), so
        cutting the wait short loses nothing: its answer is delivered at the next start."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout_s))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _finish(
        self, tracked: TrackedRequest, jpeg: bytes | None, failure: str, generation_s: float | None
    ) -> None:
        job = tracked.job
        upload = await self._outcomes.settle(job, jpeg, failure)
        uploaded = self._outcomes.expect_upload(job, upload)
        self._listener.reserve_final(job)
        recorded = False
        try:
            recorded = await self._recording.persist(
                tracked, Phase.FINISHING, "result", lambda: self._store.finish(job, generation_s, upload=upload)
            )
        finally:
            if not recorded:
                self._listener.release_final(job)
        self._tracked.pop(job.object_id, None)
        self._admission.release(job.object_id)
        if not recorded:
            # The store closed first (shutdown): SQLite still has the request queued or
            # generating, and the next start runs it again.
            if uploaded is not None:
                self._outcomes.forget_upload(job)
            return
        tracked.done()
        self.finished += 1
        self._metrics.request_finished(job, generation_s)
        if job.status is JobStatus.OK:
            log.info("%s ok on %s in %.2f s", job.object_id, job.backend, generation_s or 0.0)
        else:
            log.info("%s error: %s", job.object_id, (job.result or {}).get("content"))
        if uploaded is not None and upload is not None:
            try:
                await self._outcomes.await_upload(job, upload, uploaded)
            except BaseException:
                self._listener.release_final(job)  # committed: delivered from the backlog later
                raise
        await self._listener.job_finished(job)
        if job.status is JobStatus.OK and tracked.answered_at is not None:
            self._pools[job.executor].note_finishing(time.monotonic() - tracked.answered_at)
