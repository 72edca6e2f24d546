"""What every backend client offers the scheduler, and the HTTP error mapping they share."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.errors import BackendFailed
from app.images import NotAnImage, to_jpeg
from app.jobs import ExecutorType, GenType

log = logging.getLogger(__name__)

# How much of a backend's error body is quoted back to the client.
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class BackendSpec:
    """One entry of EXECUTORS_FILE."""

    name: str
    exec_type: ExecutorType
    endpoint: str
    timeout_s: float
    gpu: str = ""
    model: str = ""


class Backend:
    """A client for one backend instance; it runs one job at a time (the scheduler sees to it).

    Subclasses implement `_call`, which returns the raw image bytes of the first image.
    """

    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.name = spec.name
        self.executor = spec.exec_type
        self._session = session

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.spec.endpoint}>"

    async def generate(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        """Run one generation and return its image as JPEG bytes.

        Raises BackendFailed with a readable reason: retryable=False when the backend
        answered 4xx (the request is bad), True for everything that is the backend's fault
        (refused connection, timeout, 5xx, a body that is not an image).
        """
        try:
            raw = await asyncio.wait_for(self._call(gen_type, payload), self.spec.timeout_s)
        except asyncio.TimeoutError:
            raise BackendFailed(f"backend {self.name} did not answer within "
                                f"{self.spec.timeout_s:g} s") from None
        except aiohttp.ClientConnectionError as exc:
            raise BackendFailed(f"backend {self.name} is unreachable: {exc}") from None
        except aiohttp.ClientError as exc:
            raise BackendFailed(f"backend {self.name} failed: {exc}") from None
        try:
            return await asyncio.to_thread(to_jpeg, raw)
        except NotAnImage as exc:
            raise BackendFailed(f"backend {self.name} returned an image that is {exc}") from None

    async def _call(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        raise NotImplementedError

    async def _post_json(self, url: str, payload: dict[str, Any],
                         headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        """POST the payload exactly as the client sent it; raise BackendFailed on non-2xx."""
        response = await self._session.post(
            url, data=json.dumps(payload),
            headers={"Content-Type": "application/json", **(headers or {})})
        if response.status >= 400:
            body = await response.text(errors="replace")
            response.release()
            reason = _error_reason(body)
            if response.status < 500:
                raise BackendFailed(f"backend {self.name} refused the request "
                                    f"(HTTP {response.status}): {reason}", retryable=False)
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
