"""What every backend client offers the scheduler, and the HTTP error mapping they share."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.domain import json_text
from app.domain.errors import BackendFailed, FailureKind
from app.domain.jobs import ExecutorType, GenType
from app.images import NotAnImage, to_jpeg

log = logging.getLogger(__name__)

# How much of a backend's error body is quoted back to the client.
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class BackendSpec:
    """One entry of EXECUTORS_FILE."""

    name: str
    exec_type: ExecutorType
    endpoint: str
    timeout_s: float | None = None  # the least time a job gets on it; None = JOB_TIMEOUT_FLOOR_S
    gpu: str = ""
    model: str = ""
    speed: float | None = None  # relative to the reference GPU (app/domain/costs.py)
    disabled: bool = False


@dataclass(frozen=True)
class Progress:
    fraction: float  # 0..1
    eta_s: float | None  # seconds left, as the backend estimates them


class Backend:
    """A client for one backend instance; it runs one job at a time (the scheduler sees to it).

    Subclasses implement `_call` (returns the answer's body as it came), `_image_in` (the
    image in such a body) and `_probe`.
    """

    supports_progress = False

    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self._session = session

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def executor(self) -> ExecutorType:
        return self.spec.exec_type

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.spec.endpoint}>"

    async def generate(self, gen_type: GenType, payload: dict[str, Any], timeout_s: float) -> bytes:
        """Run one generation and return the backend's answer as it came (the body, read
        whole). The backend is free again once this returns; `to_jpeg` takes the image out
        of the answer and converts it.

        Raises BackendFailed with a readable reason and a `kind` (see BackendFailed).
        """
        try:
            async with asyncio.timeout(timeout_s):
                return await self._call(gen_type, payload)
        except TimeoutError:
            raise BackendFailed(
                f"backend {self.name} did not answer within {timeout_s:g} s", kind=FailureKind.TIMEOUT
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise BackendFailed(f"backend {self.name} is unreachable: {exc}", kind=FailureKind.REFUSED) from None
        except aiohttp.ClientError as exc:
            raise BackendFailed(f"backend {self.name} failed: {exc}") from None

    async def to_jpeg(self, answer: bytes) -> bytes:
        """The image in an answer of `generate`, as JPEG. In one worker thread, all of it:
        an AUTOMATIC1111 answer is JSON with the image as base64, and for img2img it echoes
        the request's megabytes too; parsing it, decoding the image and re-encoding it take
        milliseconds that the event loop (and with it every backend's next job) would wait.
        Raises BackendFailed (`malformed`)."""
        return await asyncio.to_thread(self._answer_to_jpeg, answer)

    def _answer_to_jpeg(self, answer: bytes) -> bytes:
        image = self._image_in(answer)
        try:
            return to_jpeg(image)
        except NotAnImage as exc:
            raise BackendFailed(
                f"backend {self.name} returned an image that is {exc}", kind=FailureKind.MALFORMED
            ) from None

    def _image_in(self, answer: bytes) -> bytes:
        """The image's bytes in an answer of `_call` (blocking: runs in a worker thread).
        Raises BackendFailed (`malformed`)."""
        return answer

    async def probe(self, timeout_s: float) -> str | None:
        """A cheap health check. Returns None when healthy, else a readable reason."""
        return await _reason_within(self._probe(), timeout_s, "health probe")

    async def progress(self) -> Progress | None:
        """What the backend says of its running job, if it can say anything."""
        return None

    async def interrupt(self, timeout_s: float) -> str | None:
        """Ask the backend to stop its running job. Returns None when it took the request,
        else a readable reason why not."""
        return await _reason_within(self._interrupt(), timeout_s, "interrupt")

    async def _interrupt(self) -> str | None:
        return "this backend cannot interrupt a job"

    async def _call(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        raise NotImplementedError

    async def _probe(self) -> str | None:
        raise NotImplementedError

    async def _get_ok(self, url: str, headers: dict[str, str] | None = None) -> str | None:
        """None if GET `url` answers 2xx, else the reason."""
        async with self._session.get(url, headers=headers) as response:
            if response.status < 300:
                return None
            return f"health probe answered HTTP {response.status}"

    async def _post_json(
        self, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """POST the payload exactly as the client sent it; raise BackendFailed on non-2xx."""
        # A file-like body is streamed in chunks; aiohttp warns that a large bytes body would
        # be written in one go (img2img payloads are megabytes).
        response = await self._session.post(
            url,
            data=io.BytesIO(json_text.dumps_bytes(payload)),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        if response.status >= 400:
            body = await response.text(errors="replace")
            response.release()
            reason = _error_reason(body)
            if response.status in (401, 403):
                # Our credentials, not the request: the backend is unusable until fixed.
                raise BackendFailed(
                    f"backend {self.name} refused the balancer's credentials (HTTP {response.status}): {reason}",
                    kind=FailureKind.SERVER,
                )
            if response.status < 500:
                raise BackendFailed(
                    f"backend {self.name} refused the request (HTTP {response.status}): {reason}",
                    kind=FailureKind.REJECTED,
                )
            raise BackendFailed(f"backend {self.name} failed (HTTP {response.status}): {reason}")
        return response


def _error_reason(body: str) -> str:
    """The readable part of an error body: FastAPI's `detail`, A1111's `error`/`errors`."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        parts = [str(data[key]) for key in ("detail", "error", "errors") if data.get(key)]
        if parts:
            body = " ".join(parts)
    body = " ".join(body.split())
    return body[:MAX_REASON_CHARS] or "no reason given"


async def _reason_within(asking: Awaitable[str | None], timeout_s: float, what: str) -> str | None:
    """What `asking` (a call to the backend) answers: None, or a readable reason. No answer
    within `timeout_s`, or an HTTP failure, is a reason too, beginning with `what`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await asking
    except TimeoutError:
        return f"{what} got no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return f"{what} failed: {exc or type(exc).__name__}"
