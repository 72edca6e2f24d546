"""Hands queued requests to free backends, one job per backend at a time.

Event-driven: `submit()` and a backend finishing both call `dispatch()`, which starts a job
on every idle backend that has work waiting, then returns. Nothing polls or sleeps.

A job's path: queued (in a WeightedQueue) -> claimed (attempt counted in SQLite) ->
`generating` sent -> backend call -> backend released and next job dispatched -> image
stored -> final status committed -> final message delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from app.backends.base import Backend
from app.errors import BackendFailed
from app.estimates import DurationEstimator
from app.jobs import ExecutorType, Job, JobStatus
from app.queues import WeightedQueue
from app.results import ResultWriter
from app.store import Store

log = logging.getLogger(__name__)


class JobListener(Protocol):
    """Who hears about a job's progress (the gateway's delivery)."""

    async def job_generating(self, job: Job, avg_time_s: float) -> None: ...

    async def job_finished(self, job: Job) -> None: ...


@dataclass
class BackendSlot:
    backend: Backend
    job: Job | None = None
    started_monotonic: float = 0.0

    @property
    def idle(self) -> bool:
        return self.job is None


class ExecutorPool:
    """One executor type: its queue, its backends and its duration estimate."""

    def __init__(self, executor: ExecutorType, ratio: tuple[int, int],
                 initial_guess_s: float | None = None) -> None:
        self.executor = executor
        self.queue = WeightedQueue(*ratio)
        self.slots: list[BackendSlot] = []
        self.estimator = (DurationEstimator(initial_guess_s) if initial_guess_s
                          else DurationEstimator())

    def idle_slot(self) -> BackendSlot | None:
        return next((slot for slot in self.slots if slot.idle), None)

    def eta_for_new(self, premium: bool) -> float:
        """Seconds until a request of this class, queued now, is expected to be done."""
        now = time.monotonic()
        running = [now - slot.started_monotonic for slot in self.slots if not slot.idle]
        return round(self.estimator.wait_s(self.queue.picks_before_new(premium), running,
                                           len(self.slots)), 1)


class Scheduler:
    def __init__(self, store: Store, results: ResultWriter, listener: JobListener,
                 backends: list[Backend], ratio: tuple[int, int],
                 initial_guess_s: float | None = None) -> None:
        self._store = store
        self._results = results
        self._listener = listener
        self.pools = {executor: ExecutorPool(executor, ratio, initial_guess_s)
                      for executor in ExecutorType}
        for backend in backends:
            self.pools[backend.executor].slots.append(BackendSlot(backend))
        self._running: set[asyncio.Task[None]] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.dispatched = 0
        self.finished = 0

    def __repr__(self) -> str:
        waiting = {e.value: len(p.queue) for e, p in self.pools.items()}
        return (f"<Scheduler waiting={waiting} running={len(self._running)} "
                f"dispatched={self.dispatched} finished={self.finished}>")

    def has_backends(self, executor: ExecutorType) -> bool:
        return bool(self.pools[executor].slots)

    @property
    def running(self) -> bool:
        return not self._stopping

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the queues from SQLite: interrupted jobs go back in line, in arrival order."""
        requeued = await self._store.requeue_interrupted()
        queued = await self._store.queued_jobs()
        for pool in self.pools.values():
            for duration_s in await self._store.recent_generation_seconds(pool.executor, 20):
                pool.estimator.record(duration_s)
        for job in queued:
            self.pools[job.executor].queue.push(job)
        for pool in self.pools.values():
            if len(pool.queue) and not pool.slots:
                log.warning("%d %s requests wait, but no %s backend is configured",
                            len(pool.queue), pool.executor.value, pool.executor.value)
        log.info("scheduler started: %d queued (%d were interrupted by a restart); backends: %s",
                 len(queued), requeued,
                 ", ".join(f"{e.value}={len(p.slots)}" for e, p in self.pools.items()))
        self.dispatch()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give running jobs `grace_s` to finish, then cancel them. A cancelled
        job stays `generating` in SQLite and is queued again at the next start."""
        self._stopping = True
        if self._running:
            done, pending = await asyncio.wait(set(self._running), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown: %d running jobs cancelled; they resume at next start",
                            len(pending))
                await asyncio.wait(pending)
        if self._finishing:
            await asyncio.wait(set(self._finishing))

    # -- dispatch -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job that is already committed to the store."""
        self.pools[job.executor].queue.push(job)
        self.dispatch()

    def eta_for_new(self, executor: ExecutorType, premium: bool) -> float:
        return self.pools[executor].eta_for_new(premium)

    def dispatch(self) -> None:
        """Start a job on every idle backend that has one waiting. Returns at once."""
        if self._stopping:
            return
        for pool in self.pools.values():
            while len(pool.queue):
                slot = pool.idle_slot()
                if slot is None:
                    break
                job = pool.queue.pop()
                assert job is not None
                slot.job = job
                slot.started_monotonic = time.monotonic()
                self.dispatched += 1
                self._track(self._running, self._run(pool, slot, job), f"run-{job.object_id}")

    def _track(self, tasks: set[asyncio.Task[None]], coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, pool: ExecutorPool, slot: BackendSlot, job: Job) -> None:
        backend = slot.backend
        jpeg: bytes | None = None
        failure = ""
        generation_s: float | None = None
        try:
            await self._store.claim(job, backend.name)
            log.info("%s dispatched to %s (attempt %d)", job.object_id, backend.name, job.attempts)
            await self._listener.job_generating(job, round(pool.estimator.typical_s, 1))
            started = time.monotonic()
            try:
                jpeg = await backend.generate(job.gen_type, job.payload)
            except BackendFailed as exc:
                failure = exc.reason
            generation_s = time.monotonic() - started
        except asyncio.CancelledError:
            slot.job = None
            raise
        except Exception:
            log.exception("%s failed inside the balancer", job.object_id)
            failure = "internal error in the balancer; the request was not generated"
        # The backend is free as soon as it has answered; storing and delivering the result
        # overlaps with its next job.
        slot.job = None
        self.dispatch()
        if jpeg is not None and generation_s is not None:
            pool.estimator.record(generation_s)
        self._track(self._finishing, self._finish(job, jpeg, failure, generation_s),
                    f"finish-{job.object_id}")

    async def _finish(self, job: Job, jpeg: bytes | None, failure: str,
                      generation_s: float | None) -> None:
        try:
            if jpeg is not None:
                job.result = await self._results.result_for(job, jpeg)
                job.status = JobStatus.OK
            else:
                job.result = {"content_type": "text", "content": failure}
                job.status = JobStatus.ERROR
        except Exception as exc:
            log.exception("%s: storing the image failed", job.object_id)
            job.result = {"content_type": "text", "content": f"the image could not be stored: {exc}"}
            job.status = JobStatus.ERROR
        try:
            await self._store.finish(job, generation_s)
        except Exception:
            # Not committed: the job stays `generating` and runs again after a restart.
            log.exception("%s: recording the result failed", job.object_id)
            return
        self.finished += 1
        if job.status is JobStatus.OK:
            log.info("%s ok on %s in %.2f s", job.object_id, job.backend, generation_s or 0.0)
        else:
            log.info("%s error on %s: %s", job.object_id, job.backend, failure)
        await self._listener.job_finished(job)

