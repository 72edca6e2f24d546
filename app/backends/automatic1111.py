"""AUTOMATIC1111 stable-diffusion-webui API client (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import aiohttp

from app.backends.base import Backend, BackendSpec
from app.errors import BackendFailed
from app.jobs import GenType

_ROUTES = {GenType.TEXT2IMG: "txt2img", GenType.IMG2IMG: "img2img"}


def api_base(endpoint: str) -> str:
    """Accept both `http://host:port` and the original's `http://host:port/sdapi/v1`."""
    base = endpoint.rstrip("/")
    if base.endswith("/sdapi/v1"):
        base = base[: -len("/sdapi/v1")]
    return base + "/sdapi/v1"


class Automatic1111Backend(Backend):
    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        super().__init__(spec, session)
        self.api_url = api_base(spec.endpoint)

    async def _call(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        response = await self._post_json(f"{self.api_url}/{_ROUTES[gen_type]}", payload)
        async with response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                raise BackendFailed(f"backend {self.name} answered with a body that is not JSON") from None
        images = body.get("images") if isinstance(body, dict) else None
        if not images or not isinstance(images[0], str):
            raise BackendFailed(f"backend {self.name} answered without an image")
        # Extensions may append extra images (masks, grids): the first is the result.
        first = images[0].split(",", 1)[1] if images[0].startswith("data:") else images[0]
        try:
            return base64.b64decode(first, validate=True)
        except (binascii.Error, ValueError):
            raise BackendFailed(f"backend {self.name} answered with an image that is not base64") from None
