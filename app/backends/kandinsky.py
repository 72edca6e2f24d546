"""Devoid Kandinsky 2.1 API client (`/text2img`, `/mix2images`; JPEG bodies, which are the
answer's image as they are)."""

from __future__ import annotations

from typing import Any

import aiohttp

from app.backends.base import Backend, BackendSpec
from app.domain.jobs import GenType

_ROUTES = {GenType.TEXT2IMG: "text2img", GenType.MIX2IMG: "mix2images"}


class KandinskyBackend(Backend):
    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession, api_token: str) -> None:
        super().__init__(spec, session)
        self.api_url = spec.endpoint.rstrip("/")
        self._headers = {"authorization": api_token}

    async def _call(self, gen_type: GenType, payload: dict[str, Any]) -> bytes:
        response = await self._post_json(f"{self.api_url}/{_ROUTES[gen_type]}", payload, headers=self._headers)
        async with response:
            return await response.read()

    async def _probe(self) -> str | None:
        return await self._get_ok(f"{self.api_url}/", headers=self._headers)
