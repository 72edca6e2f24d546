"""A bot that speaks exactly as the official `devoid_client` 0.1.3 does, written from what it
is known to send and expect (docs/protocol.md).

- It connects with websockets 10.4 to `/ws/{service}` with `authorization` and `service` headers.
- It serializes its payload classes whole, defaults filled, unset fields as null / [] / "".
- It keeps one request in flight per user_id and sends that user's next one only when a final
  (`ok` or `error`) for that user arrives; a second final for the same user pops an empty
  queue, which is what breaks the real client. Here it is recorded in `broken`.
- It parses `message_type` of every message and `executor` / `gen_type` / `gen_status` of
  every `response` with its enums: an unknown value ends its receive loop.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import websockets.client

MESSAGE_TYPES = {"request", "response", "info"}
EXECUTORS = {"kandinsky", "automatic1111"}
GEN_TYPES = {"text2img", "img2img", "mix2img"}
GEN_STATUSES = {"ok", "error", "queued", "generating"}


def automatic1111_payload(prompt: str, init_images: list[str] | None = None) -> dict[str, Any]:
    """The official client's automatic1111 payload class, serialized whole (`__dict__`)."""
    return {
        "prompt": prompt,
        "init_images": init_images,
        "steps": 30,
        "cfg_scale": 7,
        "sampler_index": "Euler a",
        "width": 512,
        "height": 768,
        "seed": random.randint(42, 4294967295),
        "hr_scale": 1,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 768,
        "hr_resize_y": 1024,
        "denoising_strength": 0.7,
        "negative_prompt": "child, childish",
    }


def kandinsky_payload(
    prompt: str = "", images_texts: list[str] | None = None, weights: list[float] | None = None
) -> dict[str, Any]:
    """The official client's kandinsky payload class, serialized whole."""
    return {
        "images_texts": images_texts or [],
        "weights": weights or [],
        "prompt": prompt,
        "steps": 30,
        "guidance_scale": 4,
        "height": 512,
        "width": 512,
        "sampler": "p_sampler",
        "prior_cf_scale": 4,
        "prior_steps": "5",
        "negative_prior_prompt": "",
        "negative_decoder_prompt": "",
    }


def official_request(
    executor: str,
    gen_type: str,
    payload: dict[str, Any],
    *,
    user_id: int,
    premium: Any = 0,
    sync_with_s3: Any = 0,
    moderate: Any = 0,
) -> dict[str, Any]:
    return {
        "message_type": "request",
        "executor": executor,
        "gen_type": gen_type,
        "settings": {"premium": premium, "moderate": moderate, "sync_with_s3": sync_with_s3},
        "service_info": {"user_id": user_id, "chat_id": user_id * 10, "message_id": user_id * 100},
        "payload": payload,
    }


@dataclass
class OfficialBot:
    url: str
    service: str
    key: str
    # What it waits for, per user: requests sent and not yet answered with a final.
    in_flight: dict[int, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    backlog: dict[int, deque[dict[str, Any]]] = field(default_factory=lambda: defaultdict(deque))
    finals: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    _ws: Any = None
    _reader: asyncio.Task[None] | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> None:
        self._ws = await websockets.client.connect(
            f"{self.url}/ws/{self.service}",
            extra_headers={"authorization": self.key, "service": self.service},
            max_size=64 * 1024 * 1024,
        )
        self._reader = asyncio.create_task(self._receive())

    async def close(self) -> None:
        await self._ws.close()
        if self._reader is not None:
            await self._reader

    async def request(self, message: dict[str, Any]) -> None:
        """Queue a request for its user: sent now if nothing of that user is in flight."""
        user_id = message["service_info"]["user_id"]
        self._idle.clear()
        if self.in_flight[user_id]:
            self.backlog[user_id].append(message)
            return
        self.in_flight[user_id].append(message)
        await self._ws.send(json.dumps(message))

    async def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until every request sent has had its final (or the reader stopped)."""
        async with asyncio.timeout(timeout_s):
            while any(self.in_flight.values()) or any(self.backlog.values()):
                if self._reader is not None and self._reader.done():
                    self._reader.result()
                    raise ConnectionError("the receive loop ended")
                self._idle.clear()
                await self._idle.wait()

    async def _receive(self) -> None:
        async for frame in self._ws:
            message = json.loads(frame)
            if message["message_type"] not in MESSAGE_TYPES:
                raise ValueError(f"unknown message_type {message['message_type']!r}")
            if message["message_type"] == "info":
                self.infos.append(message)
                continue
            if message["message_type"] != "response":
                continue
            # The official client builds enums from these three: an unknown value raises.
            for name, allowed in (("executor", EXECUTORS), ("gen_type", GEN_TYPES), ("gen_status", GEN_STATUSES)):
                if message[name] not in allowed:
                    raise ValueError(f"unknown {name} {message[name]!r}")
            self.responses.append(message)
            if message["gen_status"] in ("ok", "error"):
                await self._on_final(message)
        self._idle.set()

    async def _on_final(self, message: dict[str, Any]) -> None:
        self.finals.append(message)
        user_id = message["service_info"]["user_id"]
        if not self.in_flight[user_id]:
            self.broken.append(f"a final for user {user_id} with nothing in flight ({message['object_id']})")
        else:
            self.in_flight[user_id].popleft()
        if self.backlog[user_id]:
            following = self.backlog[user_id].popleft()
            self.in_flight[user_id].append(following)
            await self._ws.send(json.dumps(following))
        self._idle.set()
