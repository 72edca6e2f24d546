"""What the scheduler tells about each request as it goes (app/web/delivery.py listens)."""

from __future__ import annotations

from typing import Protocol

from app.backends.base import Progress
from app.domain.jobs import Job


class JobListener(Protocol):
    """Who hears about a job's progress (the gateway's delivery)."""

    async def job_generating(self, job: Job, avg_time_s: float) -> None: ...

    async def job_progress(self, job: Job, progress: Progress) -> None: ...

    async def job_retrying(self, job: Job, reason: str, delay_s: float) -> None: ...

    async def job_eta(self, job: Job, eta_s: float) -> None: ...

    async def job_storage_retry(self, job: Job, reason: str) -> None: ...

    def reserve_final(self, job: Job) -> None: ...

    def release_final(self, job: Job) -> None: ...

    async def job_finished(self, job: Job) -> None: ...
