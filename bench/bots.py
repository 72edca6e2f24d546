"""A bot service's side of the websocket, as the tests drive it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

FINAL = ("ok", "error")


def request_message(
    executor: str, gen_type: str, payload: dict[str, Any], *, premium: int = 0, user_id: int = 1, **service_info: Any
) -> dict[str, Any]:
    """A request exactly as docs/protocol.md shows it."""
    return {
        "message_type": "request",
        "executor": executor,
        "gen_type": gen_type,
        "settings": {"premium": premium, "moderate": 0, "sync_with_s3": 0},
        "service_info": {"user_id": user_id, "chat_id": 10, "message_id": 20, **service_info},
        "payload": payload,
    }


class Bot:
    """Sends requests and reads answers; every answer read is kept in `received`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self._unread: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def next_message(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda m: True, timeout_s: float = 15.0
    ) -> dict[str, Any]:
        """The first unread message matching `predicate`, waiting for it if needed."""
        for index, message in enumerate(self._unread):
            if predicate(message):
                return self._unread.pop(index)
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.ws.receive()
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"connection ended: {frame.type.name} {frame.data!r}")
                message = json.loads(frame.data)
                self.received.append(message)
                if predicate(message):
                    return message
                self._unread.append(message)

    async def submit(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its first answer (`queued`, or an error response)."""
        await self.send(message)
        return await self.next_message(
            lambda m: m.get("message_type") == "response" and m.get("gen_status") in ("queued", "error")
        )

    async def final(self, object_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
        return await self.next_message(
            lambda m: m.get("object_id") == object_id and m.get("gen_status") in FINAL, timeout_s
        )

    def statuses(self, object_id: str) -> list[str]:
        return [
            m["gen_status"]
            for m in self.received
            if m.get("object_id") == object_id and m.get("message_type") == "response"
        ]

    async def close(self) -> None:
        await self.ws.close()


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0) -> None:
    """Wait for something a test can see (a row, a backend's state) to become true.
    `predicate` may be a coroutine function (to read a server, say)."""
    async with asyncio.timeout(timeout_s):
        while True:
            outcome = predicate()
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(0.01)
