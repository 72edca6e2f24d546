"""Hands queued requests to healthy backends, one job per backend at a time.

Event-driven: a new request, a backend finishing, a backend coming back up and a retry's
backoff ending all call `dispatch()`, which starts a job on every available backend that
has work waiting, then returns. Nothing polls the queue.

A job's path: queued (WeightedQueue) -> claimed (attempt counted in SQLite) -> `generating`
-> backend call (with progress polling on AUTOMATIC1111) -> backend released, next job
dispatched -> image stored -> final status committed -> final message delivered.
A backend failure sends the job back to the head of its line after a backoff, to be tried
on another healthy backend, until MAX_ATTEMPTS; a 4xx ends it at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp

from app.backends.base import Backend, BackendSpec, Progress
from app.config import Config
from app.costs import job_cost_units, payload_cost_units
from app.errors import BackendFailed
from app.jobs import ExecutorType, GenType, Job, JobStatus
from app.metrics import Metrics
from app.mirrors.s3 import S3Mirror
from app.pool import BackendSlot, ExecutorPool, watch_health
from app.progress import ProgressReporter
from app.results import ResultWriter
from app.store import Store

log = logging.getLogger(__name__)

CANCELLED_REASON = "cancelled"
# Payloads larger than this (img2img and mix2img images) wait in SQLite rather than in
# memory: a backlog of them would otherwise hold every image in RAM. Read back at dispatch.
PAYLOAD_IN_MEMORY_MAX_CHARS = 64 * 1024


class JobListener(Protocol):
    """Who hears about a job's progress (the gateway's delivery)."""

    async def job_generating(self, job: Job, avg_time_s: float) -> None: ...

    async def job_progress(self, job: Job, progress: Progress) -> None: ...

    async def job_retrying(self, job: Job, reason: str, delay_s: float) -> None: ...

    async def job_finished(self, job: Job) -> None: ...


class Scheduler:
    def __init__(self, config: Config, store: Store, results: ResultWriter, listener: JobListener,
                 backends: list[Backend], make_backend: Callable[[BackendSpec], Backend],
                 uploads: S3Mirror | None = None, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._uploads = uploads
        self._store = store
        self._results = results
        self._listener = listener
        self._make_backend = make_backend
        self.pools = {executor: ExecutorPool(executor, config.general_premium_ratio)
                      for executor in ExecutorType}
        self._initial_backends = backends
        self._watchers: dict[BackendSlot, asyncio.Task[None]] = {}
        self._running: dict[str, tuple[asyncio.Task[None], BackendSlot]] = {}
        self._progress = ProgressReporter(config.progress_interval_s, config.probe_timeout_s,
                                          listener.job_progress)
        self._retry_timers: dict[str, tuple[Job, asyncio.TimerHandle]] = {}
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.dispatched = 0
        self.finished = 0
        self.retried = 0

    def __repr__(self) -> str:
        waiting = {e.value: len(p.queue) for e, p in self.pools.items()}
        return (f"<Scheduler waiting={waiting} running={len(self._running)} "
                f"dispatched={self.dispatched} retried={self.retried} finished={self.finished}>")

    def has_backends(self, executor: ExecutorType) -> bool:
        return bool(self.pools[executor].slots)

    @property
    def running(self) -> bool:
        return not self._stopping

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching the backends and rebuild the queues from SQLite: interrupted jobs
        go back in line, in arrival order."""
        for backend in self._initial_backends:
            slot = self._add_slot(backend)
            # Speeds learned before the restart are not thrown away.
            for gen_type, payload, seconds in await self._store.recent_successes(backend.name, 10):
                slot.record_success(payload_cost_units(backend.executor, gen_type, payload), seconds)
        requeued = await self._store.requeue_interrupted()
        queued = await self._store.queued_jobs()
        for job in queued:
            self._enqueue(job)
        for pool in self.pools.values():
            if len(pool.queue) and not pool.slots:
                log.warning("%d %s requests wait, but no %s backend is configured",
                            len(pool.queue), pool.executor.value, pool.executor.value)
        log.info("scheduler started: %d queued (%d were interrupted by a restart); backends: %s",
                 len(queued), requeued,
                 ", ".join(f"{e.value}={len(p.slots)}" for e, p in self.pools.items()))
        self.dispatch()  # backends whose first probe already answered

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give running jobs `grace_s` to finish, then cancel them. A cancelled
        job stays `generating` in SQLite and is queued again at the next start."""
        self._stopping = True
        for _, timer in self._retry_timers.values():
            timer.cancel()
        for timer in self._expiry_timers.values():
            timer.cancel()
        running = [task for task, _ in self._running.values()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown: %d running jobs cancelled; they resume at next start",
                            len(pending))
                await asyncio.wait(pending)
        if self._finishing:
            # A finishing job is committed before it waits on anything (a sync S3 upload), so
            # cutting the wait short loses nothing: its answer is delivered at the next start.
            _, pending = await asyncio.wait(set(self._finishing), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for slot in list(self._watchers):
            self._stop_watching(slot)
        if self._watchers:
            await asyncio.wait(list(self._watchers.values()))

    # -- backends -----------------------------------------------------------------------

    def _add_slot(self, backend: Backend) -> BackendSlot:
        slot = BackendSlot.for_backend(backend)
        self.pools[backend.executor].slots.append(slot)
        task = asyncio.create_task(watch_health(slot, self._config, self.dispatch),
                                   name=f"health-{backend.name}")
        self._watchers[slot] = task
        task.add_done_callback(lambda _: self._watchers.pop(slot, None))
        return slot

    def _stop_watching(self, slot: BackendSlot) -> None:
        slot.removed = True
        slot.wake.set()

    def _retire_if_removed(self, slot: BackendSlot) -> None:
        if slot.removed and slot.job is None and slot in self.pools[slot.backend.executor].slots:
            self.pools[slot.backend.executor].slots.remove(slot)
            log.info("backend %s removed", slot.name)

    def reload(self, specs: list[BackendSpec]) -> None:
        """Apply a new EXECUTORS_FILE: add, change, disable or remove backends. A removed
        backend's running job finishes there (or is retried elsewhere if it fails)."""
        current = {slot.name: slot for pool in self.pools.values() for slot in pool.slots
                   if not slot.removed}
        wanted = {spec.name: spec for spec in specs}
        for name, slot in current.items():
            spec = wanted.get(name)
            if spec is None or spec.exec_type is not slot.backend.executor:
                self._stop_watching(slot)
                self._retire_if_removed(slot)
                log.info("backend %s leaves the pool%s", name, " after its job" if slot.job else "")
        for name, spec in wanted.items():
            slot = current.get(name)
            if slot is not None and not slot.removed:
                if slot.backend.spec != spec:
                    # The running job keeps its client; the next one uses the new settings.
                    slot.backend = self._make_backend(spec)
                    slot.wake.set()
                    log.info("backend %s updated%s", name, " (disabled)" if spec.disabled else "")
                continue
            self._add_slot(self._make_backend(spec))
            log.info("backend %s added (%s at %s)", name, spec.exec_type.value, spec.endpoint)
        self.dispatch()

    def queues_status(self) -> list[dict[str, object]]:
        """Per executor type: who waits, what runs, and the ETA of a typical new request."""
        states = []
        for executor, pool in self.pools.items():
            typical = payload_cost_units(executor, GenType.TEXT2IMG, {})
            states.append({
                "executor": executor.value,
                "general_waiting": pool.queue.waiting(False), "premium_waiting": pool.queue.waiting(True),
                "generating": sum(1 for slot in pool.slots if slot.job is not None),
                "backends": len(pool.slots), "backends_in_service": len(pool.in_service()),
                "eta_new_general_s": pool.eta_for_new(False, typical),
                "eta_new_premium_s": pool.eta_for_new(True, typical),
            })
        return states

    def backends_status(self) -> list[dict[str, object]]:
        return [{"name": slot.name, "executor": pool.executor.value, "state": slot.state.value,
                 "units_per_s": round(slot.units_per_s), "jobs_done": slot.jobs_done,
                 "last_error": slot.last_error, "job": slot.job.object_id if slot.job else None}
                for pool in self.pools.values() for slot in pool.slots]

    # -- queueing -----------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        # Intake has costed a new job already; a job read back from SQLite is costed here.
        job.cost_units = job.cost_units or job_cost_units(job)
        _park_payload(job)
        self.pools[job.executor].queue.push(job)
        wait_left_s = job.created_at + self._config.max_queue_wait_s - time.time()
        self._expiry_timers[job.object_id] = asyncio.get_running_loop().call_later(
            max(0.0, wait_left_s), self._expire, job)

    def submit(self, job: Job) -> None:
        """Queue a job that is already committed to the store."""
        self._enqueue(job)
        self.dispatch()

    def eta_for_new(self, executor: ExecutorType, premium: bool, cost_units: float) -> float | None:
        return self.pools[executor].eta_for_new(premium, cost_units)

    def no_backend_notice(self, executor: ExecutorType) -> str | None:
        """A sentence for the client when no backend of `executor` is in service."""
        pool = self.pools[executor]
        if pool.in_service():
            return None
        return (f"No {executor.value} backend is in service right now ({pool.status_line()}); "
                f"the request stays queued for up to {self._config.max_queue_wait_s:g} s.")

    def _expire(self, job: Job) -> None:
        self._expiry_timers.pop(job.object_id, None)
        pool = self.pools[job.executor]
        retry = self._retry_timers.pop(job.object_id, None)
        if retry is not None:
            retry[1].cancel()
        elif not pool.queue.remove(job):
            return  # running or finished
        reason = (f"No {job.executor.value} backend took this request within "
                  f"{self._config.max_queue_wait_s:g} s ({pool.status_line()}). It was not generated.")
        if job.last_error:
            reason += f" Last attempt: {job.last_error}"
        log.warning("%s expired in the queue", job.object_id)
        self._track_finish(job, None, reason, None)

    # -- dispatch -----------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start a job on every available backend that has one waiting. Returns at once."""
        if self._stopping:
            return
        for pool in self.pools.values():
            while len(pool.queue):
                free = pool.available_slots()
                if not free:
                    break
                serving = {slot.name for slot in pool.in_service()}

                def can_start(job: Job) -> bool:
                    # A retried job waits for a backend that has not failed it yet, unless
                    # every backend in service already has.
                    return (any(slot.name not in job.avoid_backends for slot in free)
                            or serving <= job.avoid_backends)

                job = pool.queue.pop(accept=can_start)
                if job is None:
                    break
                choices = [slot for slot in free if slot.name not in job.avoid_backends] or free
                # Of the free backends, the one expected to finish this job first.
                slot = min(choices, key=lambda s: s.expected_s(job.cost_units))
                self._start(pool, slot, job)

    def _start(self, pool: ExecutorPool, slot: BackendSlot, job: Job) -> None:
        slot.job = job
        slot.started_monotonic = time.monotonic()
        self.dispatched += 1
        task = asyncio.create_task(self._run(pool, slot, job), name=f"run-{job.object_id}")
        self._running[job.object_id] = (task, slot)
        task.add_done_callback(lambda _: self._running.pop(job.object_id, None))

    def job_timeout_s(self, slot: BackendSlot, job: Job) -> float:
        """Expected duration x JOB_TIMEOUT_FACTOR, at least the floor (raised by the backend's
        own `timeout`), at most JOB_TIMEOUT_CAP_S."""
        config = self._config
        floor = max(config.job_timeout_floor_s, slot.backend.spec.timeout_s or 0.0)
        expected = slot.expected_s(job.cost_units) * config.job_timeout_factor
        return min(config.job_timeout_cap_s, max(floor, expected))

    async def _run(self, pool: ExecutorPool, slot: BackendSlot, job: Job) -> None:
        backend = slot.backend
        jpeg: bytes | None = None
        failure: BackendFailed | None = None
        seconds: float | None = None
        timeout_s = self.job_timeout_s(slot, job)
        try:
            if job.payload is None:
                job.payload = await self._store.load_payload(job.object_id)
            await self._store.claim(job, backend.name)
            log.info("%s dispatched to %s (attempt %d, expected %.1f s, timeout %.0f s)",
                     job.object_id, backend.name, job.attempts, slot.expected_s(job.cost_units), timeout_s)
            await self._listener.job_generating(job, round(slot.expected_s(job.cost_units), 1))
            self._progress.start(backend, job)
            started = time.monotonic()
            try:
                jpeg = await backend.generate(job.gen_type, job.payload, timeout_s)
            except BackendFailed as exc:
                failure = exc
            finally:
                await self._progress.stop(job)
            seconds = time.monotonic() - started
        except asyncio.CancelledError:
            slot.job = None
            raise
        except Exception:
            log.exception("%s failed inside the balancer", job.object_id)
            failure = BackendFailed("internal error in the balancer; the request was not generated",
                                    kind="rejected")
        slot.job = None
        self._retire_if_removed(slot)
        try:
            if job.cancelled:
                return  # already answered by cancel()
            if jpeg is not None:
                slot.record_success(job.cost_units, seconds or 0.0)
                self._track_finish(job, jpeg, "", seconds)
            elif failure is not None and not failure.retryable:
                # The request is bad (4xx): the backend is not to blame.
                self._track_finish(job, None, failure.reason, seconds)
            elif failure is not None:
                await self._after_failure(pool, slot, job, failure)
        finally:
            self.dispatch()

    async def _after_failure(self, pool: ExecutorPool, slot: BackendSlot, job: Job,
                             failure: BackendFailed) -> None:
        config = self._config
        slot.record_failure(failure.reason, backend_is_down=failure.backend_is_down,
                            breaker_failures=config.breaker_failures,
                            max_cooldown_s=config.probe_backoff_max_s)
        job.avoid_backends.add(slot.name)
        if job.attempts >= config.max_attempts:
            reason = f"Failed after {job.attempts} attempts; the last: {failure.reason}"
            self._track_finish(job, None, reason, None)
            return
        delay_s = config.retry_backoff_s * 2 ** (job.attempts - 1) * random.uniform(0.75, 1.25)
        await self._store.requeue(job, failure.reason)
        self.retried += 1
        log.warning("%s attempt %d failed on %s (%s); retrying in %.1f s",
                    job.object_id, job.attempts, slot.name, failure.reason, delay_s)
        await self._listener.job_retrying(job, failure.reason, delay_s)
        if job.cancelled:
            return
        timer = asyncio.get_running_loop().call_later(delay_s, self._back_in_line, job)
        self._retry_timers[job.object_id] = (job, timer)

    def _back_in_line(self, job: Job) -> None:
        self._retry_timers.pop(job.object_id, None)
        _park_payload(job)
        # At the head of its class: it keeps its place in line.
        self.pools[job.executor].queue.push_front(job)
        self.dispatch()

    # -- cancel -------------------------------------------------------------------------

    async def cancel(self, service: str, object_id: str) -> str:
        """Cancel a queued or running request of `service`. Returns "cancelled", or
        "unknown" when `service` has no such request waiting or running (another service's
        request is "unknown" too, so ids cannot be probed)."""
        job, where = self._locate(object_id)
        if job is None or job.service != service or job.cancelled or job.finishing:
            return "unknown"
        job.cancelled = True
        if where == "queued":
            self.pools[job.executor].queue.remove(job)
        elif where == "retrying":
            self._retry_timers.pop(object_id)[1].cancel()
        else:
            await self._progress.stop(job)
            backend = self._running[object_id][1].backend
            try:
                interrupted = await backend.interrupt()
            except (aiohttp.ClientError, TimeoutError) as exc:
                interrupted = False
                log.warning("%s: interrupt on %s failed: %s", object_id, backend.name, exc)
            # Without an interrupt the backend finishes the image; it is thrown away, and the
            # backend takes no new job until then (it would queue it behind this one).
            log.info("%s cancelled while running on %s (interrupted: %s)", object_id,
                     backend.name, interrupted)
        self._track_finish(job, None, CANCELLED_REASON, None)  # also drops its expiry timer
        self.dispatch()
        return "cancelled"

    def _locate(self, object_id: str) -> tuple[Job | None, str]:
        if object_id in self._running:
            return self._running[object_id][1].job, "running"
        if object_id in self._retry_timers:
            return self._retry_timers[object_id][0], "retrying"
        for pool in self.pools.values():
            for job in pool.queue:
                if job.object_id == object_id:
                    return job, "queued"
        return None, ""

    # -- finishing ----------------------------------------------------------------------

    def _track_finish(self, job: Job, jpeg: bytes | None, failure: str, seconds: float | None) -> None:
        if job.finishing:
            return
        job.finishing = True
        timer = self._expiry_timers.pop(job.object_id, None)
        if timer is not None:
            timer.cancel()
        # A task of its own: the backend is free for its next job while this one is stored.
        task = asyncio.create_task(self._finish(job, jpeg, failure, seconds),
                                   name=f"finish-{job.object_id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, job: Job, jpeg: bytes | None, failure: str,
                      generation_s: float | None) -> None:
        upload = None
        if job.payload is None:  # cancelled or expired while it waited: echo it all the same
            job.payload = await self._store.load_payload(job.object_id)
        try:
            if jpeg is not None:
                stored = await self._results.store_image(job, jpeg)
                job.result, upload = stored.result, stored.upload
                job.status = JobStatus.OK
            else:
                job.result = {"content_type": "text", "content": failure}
                job.status = JobStatus.ERROR
        except Exception as exc:
            log.exception("%s: storing the image failed", job.object_id)
            job.result = {"content_type": "text", "content": f"the image could not be stored: {exc}"}
            job.status = JobStatus.ERROR
        wait_for_upload = upload is not None and self._uploads is not None and job.flag("sync_with_s3")
        uploaded = self._uploads.expect(job.object_id) if wait_for_upload else None
        try:
            await self._store.finish(job, generation_s, upload=upload)
        except Exception:
            # Not committed: the job stays where SQLite has it and runs again after a restart.
            log.exception("%s: recording the result failed", job.object_id)
            if uploaded is not None:
                self._uploads.forget(job.object_id)
            return
        self.finished += 1
        self._metrics.request_finished(job, generation_s)
        if job.status is JobStatus.OK:
            log.info("%s ok on %s in %.2f s", job.object_id, job.backend, generation_s or 0.0)
        else:
            log.info("%s error: %s", job.object_id, failure)
        if uploaded is not None:
            await self._await_upload(job, upload, uploaded)
        await self._listener.job_finished(job)

    async def _await_upload(self, job: Job, upload: dict, uploaded: asyncio.Future[None]) -> None:
        """sync_with_s3: hold the ok until the image is in S3, at most S3_SYNC_TIMEOUT_S; then
        answer with the local (or base64) image while the upload carries on."""
        try:
            async with asyncio.timeout(self._config.s3_sync_timeout_s):
                await uploaded
            return
        except TimeoutError:
            self._uploads.forget(job.object_id)
        try:
            job.result = await self._results.fallback_result(job, upload)
        except FileNotFoundError:
            return  # the upload finished and removed its spooled file just now
        log.warning("%s: S3 upload not done within %.0f s; answering with a %s result",
                    job.object_id, self._config.s3_sync_timeout_s, job.result["content_type"])
        await self._store.replace_result(job)


def _park_payload(job: Job) -> None:
    """Let go of a large payload while the job waits; it is committed, and read back at
    dispatch or when the job is answered."""
    if job.payload_chars > PAYLOAD_IN_MEMORY_MAX_CHARS:
        job.payload = None
