"""Hands queued requests to healthy backends, one job per backend at a time.

Event-driven: a new request, a backend finishing, a backend coming back up and a retry's
backoff ending all call `dispatch()`, which starts a job on every available backend that
has work waiting, then returns. Nothing polls the queue.

A job's path: queued (WeightedQueue) -> claimed (attempt counted in SQLite) -> `generating`
-> backend call (with progress polling on AUTOMATIC1111) -> backend released, next job
dispatched -> image stored -> final status committed -> final message delivered (those last
three: app/engine/finishing.py; commits retried while the database refuses writes, and
messages sent without waiting for a client's socket: app/engine/recording.py).
A backend failure sends the job back to the head of its line after a backoff, to be tried
on another healthy backend, until MAX_ATTEMPTS; a 4xx ends it at once (app/engine/retries.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.backends.base import Backend, BackendSpec
from app.config import Config
from app.domain.costs import job_cost_units, payload_cost_units
from app.domain.errors import BackendFailed, FailureKind
from app.domain.jobs import ExecutorType, Job
from app.domain.lifecycle import CancelOutcome, Phase, TrackedRequest
from app.engine.admission import Admission
from app.engine.backlog import BacklogReader
from app.engine.estimates import Estimates
from app.engine.expiry import ExpiryLine
from app.engine.finishing import Finishing
from app.engine.fleet import Fleet
from app.engine.listener import JobListener
from app.engine.outcome import Outcomes
from app.engine.placement import next_placement
from app.engine.pool import BackendSlot, ExecutorPool
from app.engine.progress import ProgressReporter
from app.engine.recording import Recording
from app.engine.retries import Retries
from app.image_check import ImageCheck
from app.metrics import Metrics
from app.storage.payload_files import PayloadUnreadable
from app.storage.results import ResultWriter
from app.storage.store import Store

if TYPE_CHECKING:
    from app.mirrors.s3 import S3Mirror

log = logging.getLogger(__name__)

CANCELLED_REASON = "cancelled"
# A request running at this many restarts in a row is not run again (it may be what crashes
# the process); restarts for other reasons rarely hit one request this often.
MAX_INTERRUPTIONS = 10
INTERRUPT_TIMEOUT_S = 2.0


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        results: ResultWriter,
        listener: JobListener,
        backends: list[Backend],
        make_backend: Callable[[BackendSpec], Backend],
        admission: Admission,
        image_check: ImageCheck | None = None,
        uploads: S3Mirror | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        # Counts what this process holds per service and user, for the limits at intake.
        self.admission = admission
        self._metrics = metrics or Metrics()
        self._store = store
        self._listener = listener
        # The pools (a line and its backends per executor type) and the backends' watchers.
        self.fleet = Fleet(config, make_backend, self.dispatch)
        self.pools = self.fleet.pools
        self._initial_backends = backends
        # The one record of every request this process holds, by object_id (app/domain/lifecycle.py).
        self._tracked: dict[str, TrackedRequest] = {}
        self._expiry = ExpiryLine(self._expire, self._expiry_stands, lambda: len(self._tracked))
        self._progress = ProgressReporter(config.progress_interval_s, config.probe_timeout_s, listener.job_progress)
        # Commits that retry while the database refuses writes; messages sent off the paths
        # that hold a backend.
        self._recording = Recording(listener.job_storage_retry)
        # Each request's last steps, off its backend's path: what a finished attempt becomes
        # (image check, image stored, upload), its final commit, its delivery.
        self._finishing = Finishing(
            store,
            Outcomes(config, store, results, self._metrics, image_check, uploads),
            listener,
            self._recording,
            self._metrics,
            admission,
            self.pools,
            self._tracked,
        )
        # The estimate told with `queued`, and new ones while a request waits.
        self.estimates = Estimates(self.pools, self._tell_eta)
        # The queued requests stored by earlier runs, read back after start() returns.
        self._backlog = BacklogReader(store, self.pools, admission, self._restore, self.dispatch)
        # What follows a failed backend call: blame, a retry after a backoff, or the final error.
        self._retries = Retries(config, store, listener, self._recording, self._finishing, self._back_in_line)
        self._stopping = False
        self.dispatched = 0

    def __repr__(self) -> str:
        phases = collections.Counter(t.phase.value for t in self._tracked.values())
        return f"<Scheduler {dict(phases)} dispatched={self.dispatched} retried={self._retries.retried} finished={self.finished}>"

    @property
    def finished(self) -> int:
        return self._finishing.finished

    @property
    def running(self) -> bool:
        return not self._stopping

    def phase_of(self, object_id: str) -> Phase | None:
        """The phase of a request this process holds, or None (not held: finished or unknown)."""
        tracked = self._tracked.get(object_id)
        return tracked.phase if tracked else None

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching the backends and rebuild the queues from SQLite: interrupted jobs
        go back in line, in arrival order."""
        for backend in self._initial_backends:
            slot = self.fleet.add(backend)
            # Speeds learned before the restart are not thrown away.
            for cost_units, gen_type, payload, seconds in await self._store.reads.recent_successes(backend.name, 10):
                slot.record_success(cost_units or payload_cost_units(backend.executor, gen_type, payload), seconds)
        for pool in self.pools.values():
            pool.calibrate_unlearned()  # a backend new since the last run starts from its peers
        requeued = await self._store.requeue_interrupted()
        queued = await self._backlog.start()
        for pool in self.pools.values():
            waiting = pool.queue.waiting(False) + pool.queue.waiting(True)
            if waiting and not pool.slots:
                log.warning(
                    "%d %s requests wait, but no %s backend is configured",
                    waiting,
                    pool.executor.value,
                    pool.executor.value,
                )
        log.info(
            "scheduler started: %d queued (%d were interrupted by a restart), read back in the background;"
            " backends: %s",
            queued,
            requeued,
            ", ".join(f"{e.value}={len(p.slots)}" for e, p in self.pools.items()),
        )
        self.dispatch()  # backends whose first probe already answered
        self.estimates.start()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give running jobs and answers being stored `grace_s` in all, then
        cancel them. A cancelled job stays `generating` in SQLite and is queued again at the
        next start (as an interruption, not a failed attempt); an AUTOMATIC1111 backend whose
        job is abandoned is told to interrupt it, so the GPU does not finish it for nothing."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        await self._backlog.stop()
        self._expiry.close()
        self.estimates.stop()
        for tracked in self._tracked.values():
            tracked.cancel_timers()
        running = {t.task: t for t in self._tracked.values() if t.task is not None}
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
            # Read before the cancel: a cancelled run leaves its slot.
            abandoned = [slot for task in pending if (slot := running[task].slot) is not None]
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown: %d running jobs cancelled; they resume at next start", len(pending))
                await asyncio.wait(pending)
                await self._interrupt_abandoned(abandoned)
        await self._finishing.stop(deadline - time.monotonic())
        self._recording.stop()
        await self.fleet.stop_watching()

    async def _interrupt_abandoned(self, slots: list[BackendSlot]) -> None:
        async def interrupt(slot: BackendSlot) -> None:
            failed = await slot.backend.interrupt(INTERRUPT_TIMEOUT_S)
            if failed:
                log.warning("shutdown: could not interrupt %s: %s", slot.name, failed)
            else:
                log.info("shutdown: told %s to interrupt its abandoned job", slot.name)

        await asyncio.gather(*[interrupt(slot) for slot in slots if slot.backend.supports_progress])

    # -- queueing -----------------------------------------------------------------------

    def _track(self, job: Job, *, read_back: bool = False) -> TrackedRequest:
        """Start holding `job` (not yet in any queue)."""
        tracked = TrackedRequest(job)
        self._tracked[job.object_id] = tracked
        # Counted already when intake admitted it; at start-up, as the backlog was summed up.
        self.admission.hold(job, read_back=read_back)
        return tracked

    def _enqueue(self, job: Job, *, read_back: bool = False) -> None:
        # Intake has costed a new job already; a job read back from SQLite is costed here.
        job.cost_units = job.cost_units or job_cost_units(job)
        _park_payload(job)
        tracked = self._track(job, read_back=read_back)
        queue = self.pools[job.executor].queue
        if read_back:
            queue.push_backlog(job)
        else:
            queue.push(job)
        tracked.expires_at = job.created_at + self._config.max_queue_wait_s
        self._expiry.add(job.object_id, tracked.expires_at)

    def _restore(self, job: Job) -> None:
        """A queued request stored by an earlier run, read back (app/engine/backlog.py)."""
        if job.interruptions >= MAX_INTERRUPTIONS:
            # A request that was running at every one of these restarts may be what brings
            # the process down: it is not run again.
            self._finishing.begin(
                self._track(job, read_back=True),
                None,
                f"Interrupted by {job.interruptions} restarts of the balancer while it ran; it is not run again.",
                None,
            )
        else:
            self._enqueue(job, read_back=True)

    @property
    def reading_backlog(self) -> bool:
        """True while requests queued before this start are still being read back."""
        return not self._backlog.loaded.is_set()

    def backlog_progress(self) -> tuple[int, int]:
        """(requests read back so far, requests queued at the start)."""
        return self._backlog.read, self._backlog.total

    async def backlog_loaded(self) -> None:
        """Wait until every request queued before this start is held again."""
        await self._backlog.loaded.wait()

    def submit(self, job: Job, *, dispatch: bool = True) -> None:
        """Queue a job that is already committed to the store. With `dispatch` False the
        caller calls dispatch() itself (once for a burst of jobs queued together)."""
        self._metrics.request_accepted(job)
        self.pools[job.executor].note_arrival(job)
        self._enqueue(job)
        if dispatch:
            self.dispatch()

    def _tell_eta(self, job: Job, eta_s: float) -> None:
        """Send a waiting request its new estimate. A revision pass lets the event loop run
        between its chunks (estimates.py): one estimated before it started or was cancelled is
        not told."""
        tracked = self._tracked.get(job.object_id)
        if tracked is not None and tracked.phase is Phase.QUEUED:
            self._recording.tell(self._listener.job_eta(job, eta_s))

    def no_backend_notice(self, executor: ExecutorType) -> str | None:
        """A sentence for the client when no backend of `executor` is in service."""
        pool = self.pools[executor]
        if pool.in_service():
            return None
        return (
            f"No {executor.value} backend is in service right now ({pool.status_line()}); "
            f"the request stays queued for up to {self._config.max_queue_wait_s:g} s."
        )

    def _remove_from_queue(self, tracked: TrackedRequest) -> None:
        if tracked.phase is Phase.QUEUED:
            self.pools[tracked.job.executor].queue.remove(tracked.job)

    def _expiry_stands(self, object_id: str, deadline: float) -> bool:
        tracked = self._tracked.get(object_id)
        return tracked is not None and tracked.expires_at == deadline

    def _expire(self, object_id: str) -> None:
        tracked = self._tracked[object_id]
        tracked.expires_at = None
        if tracked.phase not in (Phase.QUEUED, Phase.RETRY_WAIT):
            return  # running: it gets its chance; finishing: answered already
        job = tracked.job
        pool = self.pools[job.executor]
        self._remove_from_queue(tracked)
        reason = (
            f"No {job.executor.value} backend took this request within "
            f"{self._config.max_queue_wait_s:g} s ({pool.status_line()}). It was not generated."
        )
        if job.last_error:
            reason += f" Last attempt: {job.last_error}"
        log.warning("%s expired in the queue", job.object_id)
        self._finishing.begin(tracked, None, reason, None)

    # -- dispatch -----------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start a job on every available backend that has one waiting. Returns at once."""
        if self._stopping:
            return
        for pool in self.pools.values():
            while (placed := next_placement(pool)) is not None:
                job, slot = placed
                self._start(pool, slot, self._tracked[job.object_id])

    def _start(self, pool: ExecutorPool, slot: BackendSlot, tracked: TrackedRequest) -> None:
        # The slot records what occupies the backend (it stays busy until the backend call
        # returns, even if the request is cancelled meanwhile); the request's own state is
        # in `tracked`.
        slot.job = tracked.job
        slot.started_monotonic = time.monotonic()
        pool.arrivals.started(tracked.job)
        self.dispatched += 1
        self._metrics.request_dispatched(tracked.job, slot.name)
        tracked.start(slot, asyncio.create_task(self._run(pool, slot, tracked), name=f"run-{tracked.object_id}"))

    def job_timeout_s(self, slot: BackendSlot, job: Job) -> float:
        """Expected duration x JOB_TIMEOUT_FACTOR, at least the floor (raised by the backend's
        own `timeout`), at most JOB_TIMEOUT_CAP_S."""
        config = self._config
        floor = max(config.job_timeout_floor_s, slot.backend.spec.timeout_s or 0.0)
        expected = slot.expected_s(job.cost_units) * config.job_timeout_factor
        return min(config.job_timeout_cap_s, max(floor, expected))

    async def _run(self, pool: ExecutorPool, slot: BackendSlot, tracked: TrackedRequest) -> None:
        job = tracked.job
        backend = slot.backend
        image: bytes | None = None
        jpeg: bytes | None = None
        failure: BackendFailed | None = None
        seconds: float | None = None
        timeout_s = self.job_timeout_s(slot, job)
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
                image = await backend.generate(job.gen_type, job.payload, timeout_s)
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
        if image is not None:
            # The backend is idle from here: it gets its next job before this one's claim is
            # committed (with instant backends that commit was most of the gap between jobs)
            # and before its image is converted and stored. After a failure it waits until the
            # failure is counted, so a backend failing at once cannot drain the line before
            # its circuit breaker opens.
            self._release(slot, tracked)
        if claim is not None:
            try:
                if not await claim:
                    # Cancelled while the claim was committed (it is being answered), or the
                    # store closed (shutdown: it runs again at the next start).
                    image = failure = None
            finally:
                claim.cancel()
                await self._progress.stop(job)  # one the claim started while the slot was left
        if tracked.slot is slot:
            self._release(slot, tracked)
        if image is not None:
            try:
                jpeg = await backend.to_jpeg(image)
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
            self.dispatch()

    def _release(self, slot: BackendSlot, tracked: TrackedRequest) -> None:
        """The backend call is over: the backend takes its next job."""
        slot.free()
        tracked.leave_slot()
        self.fleet.retire_if_removed(slot)
        self.dispatch()

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

    def _back_in_line(self, tracked: TrackedRequest) -> None:
        tracked.back_in_line()
        _park_payload(tracked.job)
        # At the head of its class: it keeps its place in line.
        self.pools[tracked.job.executor].queue.push_front(tracked.job)
        self.dispatch()

    # -- cancel -------------------------------------------------------------------------

    async def cancel_request(self, service: str, object_id: str) -> CancelOutcome:
        """cancel(), for a request that may not be read back yet at start-up (it then waits
        for the backlog to be read, a few seconds at most)."""
        if object_id not in self._tracked and self.reading_backlog:
            await self.backlog_loaded()
        return self.cancel(service, object_id)

    def cancel(self, service: str, object_id: str) -> CancelOutcome:
        """Cancel a queued, running or retry-waiting request of `service`. Its final `error`
        ("cancelled") follows through delivery. Another service's request is NOT_FOUND too,
        so ids cannot be probed. Nothing here awaits: the request is located and moved to
        FINISHING in one step, so no other path can act on it in between."""
        tracked = self._tracked.get(object_id)
        if tracked is None or tracked.job.service != service:
            return CancelOutcome.NOT_FOUND
        if tracked.phase in (Phase.FINISHING, Phase.DONE):
            return CancelOutcome.FINISHING
        was, slot = tracked.phase, tracked.slot
        self._remove_from_queue(tracked)
        self._finishing.begin(tracked, None, CANCELLED_REASON, None, cancelled=True)
        if was is Phase.RUNNING and slot is not None:
            # The backend keeps the slot until its call returns; an interrupt makes that soon.
            self._recording.tell(self._interrupt_cancelled(tracked.job, slot.backend))
        self.dispatch()
        return CancelOutcome.CANCELLED

    async def _interrupt_cancelled(self, job: Job, backend: Backend) -> None:
        await self._progress.stop(job)
        failed = await backend.interrupt(INTERRUPT_TIMEOUT_S)
        if failed and backend.supports_progress:  # one that can interrupt a job did not
            log.warning("%s: interrupt on %s failed: %s", job.object_id, backend.name, failed)
        # Without an interrupt the backend finishes the image; it is thrown away, and the
        # backend takes no new job until then (it would queue it behind this one).
        log.info("%s cancelled while running on %s (interrupted: %s)", job.object_id, backend.name, not failed)


def _park_payload(job: Job) -> None:
    """Let go of a large payload while the job waits; it is committed, and read back at
    dispatch or when the job is answered."""
    if job.has_large_payload:
        job.payload = None
