"""The optional image hook of moderation (IMAGE_CHECK_URL): for a request with
settings.moderate=1, the finished JPEG is POSTed to the operator's classifier before it is
stored or sent, and the classifier decides whether it may be delivered.

The contract (docs/operations.md, Image check): `POST IMAGE_CHECK_URL` with the JPEG as the
body (`Content-Type: image/jpeg`) and the headers `X-Devoid-Object-Id`, `X-Devoid-Service`;
the answer is JSON `{"allowed": true}` or `{"allowed": false, "reason": "..."}`.

It fails closed: moderation was asked for, so an image the classifier could not judge (down,
timed out, a malformed answer, after IMAGE_CHECK_ATTEMPTS tries) is not delivered; the request
ends with an error saying so.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from marshmallow import Schema, ValidationError, fields

from app.domain.jobs import Job

log = logging.getLogger(__name__)

IMAGE_CHECK_ATTEMPTS = 3
FIRST_RETRY_S = 0.5
MAX_REASON_CHARS = 300


class VerdictSchema(Schema):
    allowed = fields.Boolean(required=True, truthy={True}, falsy={False})  # JSON true or false only
    reason = fields.String(load_default="")


_verdict_schema = VerdictSchema()


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # why not, for the client


class ImageCheck:
    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.url = url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def judge(self, job: Job, jpeg: bytes) -> Verdict:
        """The classifier's verdict on `jpeg`; after IMAGE_CHECK_ATTEMPTS failed tries, a
        refusal that says the check could not be made."""
        problem = ""
        for attempt in range(IMAGE_CHECK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(FIRST_RETRY_S * 2 ** (attempt - 1))
            try:
                return await self._ask(job, jpeg)
            except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as exc:
                problem = f"{type(exc).__name__}: {exc}".strip()[:MAX_REASON_CHARS]
                log.warning("%s: the image check at %s failed (%s)", job.object_id, self.url, problem)
        return Verdict(
            False,
            f"Moderation was asked for, and the image check could not be made after {IMAGE_CHECK_ATTEMPTS} "
            "tries; the image is not delivered.",
        )

    async def _ask(self, job: Job, jpeg: bytes) -> Verdict:
        headers = {"Content-Type": "image/jpeg", "X-Devoid-Object-Id": job.object_id, "X-Devoid-Service": job.service}
        async with self._session.post(self.url, data=jpeg, headers=headers, timeout=self._timeout) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            loaded = _verdict_schema.load(await response.json(content_type=None))
        reason = str(loaded["reason"])[:MAX_REASON_CHARS]
        return Verdict(loaded["allowed"], reason)
