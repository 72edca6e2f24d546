"""One attempt of a request on the backend the dispatcher gave it (app/engine/scheduler.py):
the backend called at once while the claim (the attempt counted, `generating`) is committed,
progress polled meanwhile, the backend released for its next job as soon as it answers, the
image taken out of its answer and converted; then the attempt handed on: to Finishing when it
succeeded or the request itself is bad (a 4xx), to Retries when the backend failed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app.config import Config
from app.domain.errors import BackendFailed, FailureKind
from app.domain.jobs import Job
from app.domain.lifecycle import Phase, TrackedRequest
from app.engine.finishing import Finishing
from app.engine.listener import JobListener
from app.engine.pool import BackendSlot, ExecutorPool
from app.engine.progress import ProgressReporter
from app.engine.recording import Recording
from app.engine.retries import Retries
from app.storage.payload_files import PayloadUnreadable
from app.storage.store import Store

log = logging.getLogger(__name__)


class Attempts:
    """`release(slot, tracked)` frees a backend whose call is over (and dispatches its next
    job); `dispatch()` looks for work for every free backend."""

    def __init__(
        self,
        config: Config,
        store: Store,
        listener: JobListener,
        progress: ProgressReporter,
        recording: Recording,
        finishing: Finishing,
        retries: Retries,
        release: Callable[[BackendSlot, TrackedRequest], None],
        dispatch: Callable[[], None],
    ) -> None:
        self._config = config
        self._store = store
        self._listener = listener
        self._progress = progress
        self._recording = recording
        self._finishing = finishing
        self._retries = retries
        self._release = release
        self._dispatch = dispatch

    def timeout_s(self, slot: BackendSlot, job: Job) -> float:
        """Expected duration x JOB_TIMEOUT_FACTOR, at least the floor (raised by the backend's
        own `timeout`), at most JOB_TIMEOUT_CAP_S."""
        config = self._config
        floor = max(config.job_timeout_floor_s, slot.backend.spec.timeout_s or 0.0)
        expected = slot.expected_s(job.cost_units) * config.job_timeout_factor
        return min(config.job_timeout_cap_s, max(floor, expected))

    async def run(self, pool: ExecutorPool, slot: BackendSlot, tracked: TrackedRequest) -> None:
        job = tracked.job
        backend = slot.backend
        answer: bytes | None = None  # the backend's body, as it came
        jpeg: bytes | None = None
        failure: BackendFailed | None = None
        seconds: float | None = None
        timeout_s = self.timeout_s(slot, job)
        claim: asyncio.Task[bool] | None = None
        try:
            if job.payload is None:
                job.payload = await self._store.reads.load_payload(job.object_id)
            # The backend starts at once; the claim (the attempt counted, status `generating`)
            # is committed meanwhile, not before: its fsync would leave the GPU idle for
            # milliseconds per job. `generating` is sent once the claim is committed, and the
            # job is finished only after it. A crash before that commit re-runs the request
            # at the next start without counting the interruption.
            claim = asyncio.create_task(self._claim(tracked, slot, timeout_s))
            started = time.monotonic()
            try:
                answer = await backend.generate(job.gen_type, job.payload, timeout_s)
            except BackendFailed as exc:
                failure = exc
            except BaseException:
                claim.cancel()
                claim = None
                await self._progress.stop(job)
                raise
            tracked.answered_at = time.monotonic()
            seconds = tracked.answered_at - started
            # Before the backend takes another job (its progress endpoint then reports that
            # one). Not awaited here: waiting for the cancelled poller to end would cost the
            # backend a turn of the event loop before its next job; it is awaited below.
            self._progress.halt(job)
        except asyncio.CancelledError:
            if claim is not None:
                claim.cancel()
            slot.free()
            tracked.leave_slot()
            raise
        except PayloadUnreadable as exc:
            log.error("%s cannot be sent to a backend: %s", job.object_id, exc)
            failure = BackendFailed(str(exc), kind=FailureKind.REJECTED)
        except Exception:
            log.exception("%s failed inside the balancer", job.object_id)
            failure = BackendFailed(
                "internal error in the balancer; the request was not generated", kind=FailureKind.REJECTED
            )
        if answer is not None:
            # The backend is idle from here: it gets its next job before this one's claim is
            # committed (with instant backends that commit was most of the gap between jobs)
            # and before its answer is parsed and its image converted and stored. After a
            # failed call it waits until the failure is counted, so a backend failing at once
            # cannot drain the line before its circuit breaker opens.
            self._release(slot, tracked)
        if claim is not None:
            try:
                if not await claim:
                    # Cancelled while the claim was committed (it is being answered), or the
                    # store closed (shutdown: it runs again at the next start).
                    answer = failure = None
            finally:
                claim.cancel()
                await self._progress.stop(job)  # one the claim started while the slot was left
        if tracked.slot is slot:
            self._release(slot, tracked)
        if answer is not None:
            try:
                # An answer that holds no readable image is found here, after the release,
                # and counted against the backend like any failure.
                jpeg = await backend.to_jpeg(answer)
            except BackendFailed as exc:
                failure = exc
        try:
            if tracked.phase is not Phase.RUNNING:
                return  # cancelled (or expired) meanwhile: already being answered
            if jpeg is not None:
                slot.record_success(job.cost_units, seconds or 0.0)
                pool.calibrate_unlearned()
                self._retries.served(slot, tracked)
                self._finishing.begin(tracked, jpeg, "", seconds)
            elif failure is not None and not failure.retryable:
                # The request is bad (4xx): the backend is not to blame.
                self._finishing.begin(tracked, None, failure.reason, seconds)
            elif failure is not None:
                await self._retries.after_failure(slot, tracked, failure)
        finally:
            self._dispatch()

    async def _claim(self, tracked: TrackedRequest, slot: BackendSlot, timeout_s: float) -> bool:
        """Commit that `slot`'s backend runs the request, then tell its client. False when
        it was cancelled meanwhile or the store closed."""
        job = tracked.job
        claimed = await self._recording.persist(
            tracked, Phase.RUNNING, "claim", lambda: self._store.claim(job, slot.name)
        )
        if not claimed or tracked.phase is not Phase.RUNNING:
            return False
        log.info(
            "%s dispatched to %s (attempt %d, expected %.1f s, timeout %.0f s)",
            job.object_id,
            slot.name,
            job.attempts,
            slot.expected_s(job.cost_units),
            timeout_s,
        )
        self._recording.tell(self._listener.job_generating(job, round(slot.expected_s(job.cost_units), 1)))
        if tracked.slot is slot:  # else the backend has returned already, maybe running another job
            self._progress.start(slot.backend, job)
        return True
