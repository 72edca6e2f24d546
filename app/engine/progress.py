"""Progress of running AUTOMATIC1111 jobs, polled from `/sdapi/v1/progress` and passed on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from app.backends.base import Backend, Progress
from app.domain.jobs import Job

log = logging.getLogger(__name__)


class ProgressReporter:
    """One poller per running job on a backend that reports progress; every `interval_s` it
    asks the backend and passes on values that went up (a backend's counter restarts between
    passes, e.g. hires fix)."""

    def __init__(self, interval_s: float, timeout_s: float, report: Callable[[Job, Progress], Awaitable[None]]) -> None:
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._report = report
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, backend: Backend, job: Job) -> None:
        if backend.supports_progress and self._interval_s > 0:
            self._tasks[job.object_id] = asyncio.create_task(self._poll(backend, job), name=f"progress-{job.object_id}")

    def halt(self, job: Job) -> None:
        """Cancel polling for `job` now, without waiting for the poller to end: it sends no
        further poll to the backend (one in flight has its answer dropped), and writes no
        further report. `stop` still waits for it to end."""
        task = self._tasks.get(job.object_id)
        if task is not None:
            task.cancel()

    async def stop(self, job: Job) -> None:
        """Stop polling; returns once no further report for `job` can be sent (so none
        follows its final answer): `halt`, then the poller's end awaited. Safe to call twice."""
        self.halt(job)
        task = self._tasks.pop(job.object_id, None)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _poll(self, backend: Backend, job: Job) -> None:
        last_fraction = 0.0
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                async with asyncio.timeout(self._timeout_s):
                    progress = await backend.progress()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("%s: progress poll failed: %s", job.object_id, exc)
                continue
            if progress is not None and progress.fraction > last_fraction:
                last_fraction = progress.fraction
                await self._report(job, progress)
