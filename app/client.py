"""A command-line client that connects like a bot service, shows the request's way through the
queue, and saves the image.

    python -m app.client "a lighthouse at dusk" [--executor kandinsky] [--output out.jpg]

Exit status: 0 saved, 1 the request ended in an error, 2 refused (wrong key or service),
3 the server could not be reached or the connection broke.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import aiohttp

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
BAR_WIDTH = 24


class ClientError(Exception):
    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--executor", choices=["kandinsky", "automatic1111"], default="kandinsky")
    parser.add_argument("--gen-type", choices=["text2img"], default="text2img",
                        help="only text2img from the command line")
    parser.add_argument("--premium", action="store_true", help="send as a premium request")
    parser.add_argument("--steps", type=int, help="sampling steps (backend default if left out)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--url", default=os.environ.get("DEVOID_URL", "http://127.0.0.1:8080"),
                        help="server URL (env DEVOID_URL)")
    parser.add_argument("--service", default=os.environ.get("DEVOID_SERVICE", "test"),
                        help="service name (env DEVOID_SERVICE)")
    parser.add_argument("--key", default=os.environ.get("DEVOID_KEY", "demo-key"),
                        help="service key (env DEVOID_KEY); the default is TEST_MODE's demo key")
    parser.add_argument("--output", type=Path, help="where to save the image (default <object_id>.jpg)")
    return parser.parse_args(argv)


def request_message(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {"prompt": args.prompt}
    for name in ("steps", "width", "height"):
        if getattr(args, name) is not None:
            payload[name] = getattr(args, name)
    return {"message_type": "request", "executor": args.executor, "gen_type": args.gen_type,
            "settings": {"premium": int(args.premium), "moderate": 0, "sync_with_s3": 1},
            "service_info": {"user_id": 0, "client": "app.client"}, "payload": payload}


class ProgressView:
    """One status line, redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""

    def show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self._tty:
            self._stream.write("\r\033[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")


def describe(message: dict[str, Any]) -> str | None:
    """The status line for one server message, or None for messages that change nothing."""
    if message.get("message_type") == "response":
        if message["gen_status"] in ("ok", "error"):
            return message["gen_status"]
        eta = message.get("avg_time")
        eta_text = "waiting for a backend" if eta is None else f"ETA {eta:.1f} s"
        return f"{message['gen_status']:<10} {eta_text}"
    info_type = message.get("info_type")
    if info_type == "progress":
        fraction = message["progress"]
        filled = int(fraction * BAR_WIDTH)
        eta = message.get("eta_relative")
        return (f"generating [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}"
                + (f" ETA {eta:.1f} s" if eta is not None else ""))
    if info_type in ("retrying", "no_backend"):
        return f"{info_type}: {message['content']}"
    return None


async def generate(args: argparse.Namespace, view: ProgressView) -> Path:
    """Send the request, follow it, save the image. Raises ClientError."""
    ws_url = args.url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
    headers = {"authorization": args.key, "service": args.service}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(f"{ws_url}/ws/{args.service}", headers=headers,
                                          max_msg_size=64 * 1024 * 1024) as ws:
                await ws.send_json(request_message(args))
                final = await follow(ws, view)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise ClientError(f"the server refused service {args.service!r} with this key "
                                  "(HTTP 401)", EXIT_REFUSED) from None
            raise ClientError(f"the server refused the connection (HTTP {exc.status})",
                              EXIT_UNREACHABLE) from None
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach the server at {args.url}: {exc}", EXIT_UNREACHABLE) from None
        if final["gen_status"] != "ok":
            raise ClientError(f"the request failed: {final['result']['content']}", EXIT_FAILED)
        return await save(session, final, args.output)


async def follow(ws: aiohttp.ClientWebSocketResponse, view: ProgressView) -> dict[str, Any]:
    object_id = None
    async for frame in ws:
        if frame.type is not aiohttp.WSMsgType.TEXT:
            break
        message = json.loads(frame.data)
        if message.get("message_type") == "info" and message.get("info_type") == "error":
            raise ClientError(f"the server refused the message: {message['content']}", EXIT_FAILED)
        if object_id is None and message.get("message_type") == "response":
            object_id = message["object_id"]
        if message.get("object_id") not in (None, object_id):
            continue  # an answer for another request of this service
        line = describe(message)
        if line:
            view.show(line)
        if message.get("gen_status") in ("ok", "error"):
            view.done()
            return message
    raise ClientError("the connection closed before the request finished", EXIT_UNREACHABLE)


async def save(session: aiohttp.ClientSession, final: dict[str, Any], output: Path | None) -> Path:
    result = final["result"]
    path = output or Path(result.get("file_name") or f"{final['object_id']}.jpg")
    if result["content_type"] == "base64":
        data = base64.b64decode(result["content"])
    else:
        try:
            async with session.get(result["content"]) as response:
                if response.status != 200:
                    raise ClientError(f"the image at {result['content']} answered HTTP {response.status}",
                                      EXIT_FAILED)
                data = await response.read()
        except aiohttp.ClientError as exc:
            raise ClientError(f"cannot download {result['content']}: {exc}", EXIT_UNREACHABLE) from None
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    view = ProgressView(sys.stderr)
    try:
        path = asyncio.run(generate(args, view))
    except ClientError as exc:
        view.done()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    print(f"saved {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
