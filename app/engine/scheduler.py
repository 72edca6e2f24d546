"""Hands queued requests to healthy backends, one job per backend at a time.

Event-driven: a new request, a backend finishing, a backend coming back up and a retry's
backoff ending all call `dispatch()`, which starts a job on every available backend that
has work waiting, then returns. Nothing polls the queue.

A job's path: queued (WeightedQueue) -> claimed (attempt counted in SQLite) -> `generating`
-> backend call (with progress polling on AUTOMATIC1111) -> backend released, next job
dispatched (those after the line: app/engine/attempts.py) -> image stored -> final status
committed -> final message delivered (those last three: app/engine/finishing.py; commits
retried while the database refuses writes, and messages sent without waiting for a client's
socket: app/engine/recording.py).
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
from app.domain.jobs import ExecutorType, Job
from app.domain.lifecycle import CancelOutcome, Phase, TrackedRequest
from app.engine.admission import Admission
from app.engine.attempts import Attempts
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
        # Each dispatched job's attempt on its backend, up to its hand-over to the two above.
        self.attempts = Attempts(
            config,
            store,
            listener,
            self._progress,
            self._recording,
            self._finishing,
            self._retries,
            self._release,
            self.dispatch,
        )
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
        tracked.start(
            slot, asyncio.create_task(self.attempts.run(pool, slot, tracked), name=f"run-{tracked.object_id}")
        )

    def _release(self, slot: BackendSlot, tracked: TrackedRequest) -> None:
        """The backend call is over: the backend takes its next job."""
        slot.free()
        tracked.leave_slot()
        self.fleet.retire_if_removed(slot)
        self.dispatch()

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
            log.warning("%s: could not interrupt %s: %s", job.object_id, backend.name, failed)
        # Without an interrupt the backend finishes the image; it is thrown away, and the
        # backend takes no new job until then (it would queue it behind this one).
        log.info("%s cancelled while running on %s (interrupted: %s)", job.object_id, backend.name, not failed)


def _park_payload(job: Job) -> None:
    """Let go of a large payload while the job waits; it is committed, and read back at
    dispatch or when the job is answered."""
    if job.has_large_payload:
        job.payload = None
