"""What clients are told to expect: the estimate sent with `queued`, and while a request waits,
a new one (`info` `eta`) whenever it has moved by more than the larger of ETA_CHANGE_SHARE of
it and ETA_CHANGE_S, checked every ETA_REFRESH_S (ETA_REFRESH_CHUNK requests per turn of the
event loop), at most once every ETA_MIN_INTERVAL_S per request. The estimates themselves are
the pools' (ExecutorPool.eta_for_new and waiting_estimates); a failing one is logged and never
stops a request or the revisions.

A new request's estimate also counts the requests of the other class whose commit is under way
as it is told (Committing): they join the line right after it, and the ratio lets them pass
it. In a burst those are the rest of the burst; without them its general requests were told
too little and its last ones too much (bench/scheduling_replay.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from app.domain.jobs import ExecutorType, Job
from app.engine.pool import ExecutorPool, Later, ServingNow

log = logging.getLogger(__name__)

ETA_REFRESH_S = 2.0
ETA_REFRESH_LIMIT = 1000  # waiting requests per executor type re-estimated each time
# Estimates revised in one turn of the event loop. A pass over a long line took 7-13 ms in one
# stretch (1,000 estimates on 8 backends, bench.e2e): every connection, /health probe and
# dispatch waited that long every ETA_REFRESH_S.
ETA_REFRESH_CHUNK = 100
ETA_CHANGE_SHARE = 0.2
ETA_CHANGE_S = 5.0
ETA_MIN_INTERVAL_S = 5.0


class Estimates:
    """`tell(job, eta_s)` sends a waiting request's new estimate to its client."""

    def __init__(self, pools: dict[ExecutorType, ExecutorPool], tell: Callable[[Job, float], None]) -> None:
        self._pools = pools
        self._tell = tell
        self.committing = Committing()
        self._revisions: asyncio.Task[None] | None = None

    def for_new(self, job: Job, burst: BurstReading | None = None) -> float | None:
        """The estimate told with `queued`; None when there is none. Intake asks after the
        request is committed and before it is queued: an estimate that fails (a bug in it) is
        logged and the request goes on without one, rather than being left committed but not
        in line until the next start. `burst` holds the backends as read for the requests
        answered together with this one."""
        self.committing.discard(job)
        try:
            later = self.committing.of_class(job.executor, not job.premium)
            pool = self._pools[job.executor]
            serving_now = burst.serving(pool) if burst is not None else None
            return pool.eta_for_new(job.premium, job.cost_units, later, serving_now)
        except Exception:
            log.exception("the estimate for a new %s request failed; it is queued without one", job.executor.value)
            return None

    def start(self) -> None:
        self._revisions = asyncio.create_task(self._revise(), name="eta-revisions")

    def stop(self) -> None:
        if self._revisions is not None:
            self._revisions.cancel()

    async def _revise(self) -> None:
        while True:
            await asyncio.sleep(ETA_REFRESH_S)
            for pool in self._pools.values():
                await self.revise(pool)

    async def revise(self, pool: ExecutorPool) -> None:
        """One pass over `pool`'s waiting requests, ETA_REFRESH_CHUNK estimates per turn of the
        event loop. Requests that leave the line during the pass may still be estimated; the
        teller drops those (Scheduler._tell_eta)."""
        estimates = pool.waiting_estimates(ETA_REFRESH_LIMIT)
        while True:
            try:
                chunk = list(itertools.islice(estimates, ETA_REFRESH_CHUNK))
            except Exception:  # a bug in the estimate: logged, and the revisions go on
                log.exception("revising the %s estimates failed", pool.executor.value)
                return
            now = time.monotonic()
            for job, eta_s in chunk:
                if now - job.eta_told_at < ETA_MIN_INTERVAL_S:
                    continue
                moved = abs(now + eta_s - job.eta_due) if job.eta_due is not None else float("inf")
                if moved > max(ETA_CHANGE_SHARE * eta_s, ETA_CHANGE_S):
                    job.eta_due, job.eta_told_at = now + eta_s, now
                    self._tell(job, round(eta_s, 1))
            if len(chunk) < ETA_REFRESH_CHUNK:
                return
            await asyncio.sleep(0)


class BurstReading:
    """The backends of each executor type as read for the first estimate of a burst whose
    requests are answered in one stretch of the event loop; the others' estimates use the same
    reading (app/engine/pool.py, ServingNow, says why that holds)."""

    def __init__(self) -> None:
        self._serving: dict[ExecutorType, ServingNow] = {}

    def serving(self, pool: ExecutorPool) -> ServingNow:
        serving = self._serving.get(pool.executor)
        if serving is None:
            serving = self._serving[pool.executor] = pool.serving_now()
        return serving


class Committing:
    """The requests admitted at intake whose commit is under way (not in line yet), counted per
    executor type and class: intake adds each as it is admitted and discards it when it is
    refused or told its estimate."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._counts: dict[tuple[ExecutorType, bool], int] = {}
        self._units: dict[tuple[ExecutorType, bool], float] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        if job.object_id in self._jobs:
            return
        self._jobs[job.object_id] = job
        key = (job.executor, job.premium)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._units[key] = self._units.get(key, 0.0) + job.cost_units

    def discard(self, job: Job) -> None:
        if self._jobs.pop(job.object_id, None) is None:
            return
        key = (job.executor, job.premium)
        self._counts[key] -= 1
        self._units[key] = self._units[key] - job.cost_units if self._counts[key] else 0.0

    def of_class(self, executor: ExecutorType, premium: bool) -> Later | None:
        count = self._counts.get((executor, premium), 0)
        return Later(count, self._units[(executor, premium)]) if count else None
