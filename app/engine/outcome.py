"""What a finished attempt becomes, before its final is committed: the payload read back (to
echo it), the image check of a moderated request (IMAGE_CHECK_URL), and the image stored
(locally, for S3, or inline) or the failure's text. Then, after the commit, the wait a
`sync_with_s3` request's ok makes for its upload.

The scheduler (app/engine/scheduler.py `_finish`) owns the order around these: reserve the
delivery, commit, stop tracking, answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.config import Config
from app.domain.jobs import Job, JobStatus
from app.image_check import ImageCheck
from app.metrics import Metrics
from app.mirrors.s3 import S3Mirror
from app.storage.payload_files import PayloadUnreadable
from app.storage.results import ResultWriter
from app.storage.store import Store

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(
        self,
        config: Config,
        store: Store,
        results: ResultWriter,
        metrics: Metrics,
        image_check: ImageCheck | None,
        uploads: S3Mirror | None,
    ) -> None:
        self._config = config
        self._store = store
        self._results = results
        self._metrics = metrics
        self._image_check = image_check
        self._uploads = uploads

    async def settle(self, job: Job, jpeg: bytes | None, failure: str) -> dict[str, Any] | None:
        """Set the job's final status and result; returns the S3 upload to commit with it,
        if any. A failure here (a full disk) becomes the request's error, not a crash."""
        upload = None
        try:
            if job.payload is None:  # cancelled or expired while it waited: echo it all the same
                try:
                    job.payload = await self._store.reads.load_payload(job.object_id)
                except PayloadUnreadable as exc:
                    log.warning("%s: its final echoes an empty payload: %s", job.object_id, exc)
                    job.payload = {}
            if jpeg is not None and self._image_check is not None and job.flag("moderate"):
                verdict = await self._image_check.judge(job, jpeg)
                self._metrics.moderated.labels("image", "passed" if verdict.allowed else "blocked").inc()
                if not verdict.allowed:
                    jpeg = None
                    failure = f"Refused by image moderation: {verdict.reason or 'the image check did not allow it.'}"
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
        return upload

    def expect_upload(self, job: Job, upload: dict[str, Any] | None) -> asyncio.Future[None] | None:
        """For a `sync_with_s3` request with an upload: the future of its upload, taken before
        the upload row is committed so a fast upload cannot be missed."""
        if upload is None or self._uploads is None or not job.flag("sync_with_s3"):
            return None
        return self._uploads.expect(job.object_id)

    def forget_upload(self, job: Job) -> None:
        if self._uploads is not None:
            self._uploads.forget(job.object_id)

    async def await_upload(self, job: Job, upload: dict[str, Any], uploaded: asyncio.Future[None]) -> None:
        """sync_with_s3: hold the ok until the image is in S3, at most S3_SYNC_TIMEOUT_S; then
        answer with the local (or base64) image while the upload carries on."""
        try:
            async with asyncio.timeout(self._config.s3_sync_timeout_s):
                await uploaded
            return
        except TimeoutError:
            self.forget_upload(job)
        try:
            job.result = await self._results.fallback_result(job, upload)
        except FileNotFoundError:
            return  # the upload finished and removed its spooled file just now
        log.warning(
            "%s: S3 upload not done within %.0f s; answering with a %s result",
            job.object_id,
            self._config.s3_sync_timeout_s,
            job.result["content_type"],
        )
        await self._store.replace_result(job)
