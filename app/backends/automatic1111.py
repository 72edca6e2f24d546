"""AUTOMATIC1111 stable-diffusion-webui API client (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import aiohttp

from app.backends.base import Backend, BackendSpec, Progress
from app.domain import json_text
from app.domain.errors import BackendFailed, FailureKind
from app.domain.jobs import GenType

_ROUTES = {GenType.TEXT2IMG: "txt2img", GenType.IMG2IMG: "img2img"}


def api_root(endpoint: str) -> str:
    """Accept both `http://host:port` and the original's `http://host:port/sdapi/v1`."""
    root = endpoint.rstrip("/")
    if root.endswith("/sdapi/v1"):
        root = root[: -len("/sdapi/v1")]
    return root


class Automatic1111Backend(Backend):
    supports_progress = True

    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        super().__init__(spec, session)
        self.root_url = api_root(spec.endpoint)
        self.api_url = self.root_url + "/sdapi/v1"

    async def _call(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        response = await self._post_json(f"{self.api_url}/{_ROUTES[gen_type]}", payload)
        async with response:
            return await response.read()

    def _image_in(self, answer: bytes) -> bytes:
        try:
            body = json_text.loads(answer)
        except ValueError:
            raise BackendFailed(
                f"backend {self.name} answered with a body that is not JSON", kind=FailureKind.MALFORMED
            ) from None
        images = body.get("images") if isinstance(body, dict) else None
        if not images or not isinstance(images[0], str):
            raise BackendFailed(f"backend {self.name} answered without an image", kind=FailureKind.MALFORMED)
        # Extensions may append extra images (masks, grids): the first is the result.
        first = images[0].split(",", 1)[1] if images[0].startswith("data:") else images[0]
        try:
            return base64.b64decode(first, validate=True)
        except (binascii.Error, ValueError):
            raise BackendFailed(
                f"backend {self.name} answered with an image that is not base64", kind=FailureKind.MALFORMED
            ) from None

    async def _probe(self) -> str | None:
        # /memory answers in API-only and UI mode, even mid-generation; /internal/ping only
        # in UI mode, so it is the fallback for servers that lack /memory.
        reason = await self._get_ok(f"{self.api_url}/memory")
        if reason and "HTTP 404" in reason:
            reason = await self._get_ok(f"{self.root_url}/internal/ping")
        return reason

    async def progress(self) -> Progress | None:
        async with self._session.get(f"{self.api_url}/progress", params={"skip_current_image": "true"}) as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None, loads=json_text.loads)
        fraction = body.get("progress") if isinstance(body, dict) else None
        if not isinstance(fraction, (int, float)):
            return None
        eta = body.get("eta_relative")
        return Progress(
            fraction=min(1.0, max(0.0, float(fraction))),
            eta_s=float(eta) if isinstance(eta, (int, float)) and eta >= 0 else None,
        )

    async def _interrupt(self) -> str | None:
        async with self._session.post(f"{self.api_url}/interrupt", json={}) as response:
            return None if response.status < 300 else f"it answered HTTP {response.status}"
