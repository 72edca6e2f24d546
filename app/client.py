"""A command-line client that sends one request as a bot service would, shows its way through
the queue, and saves the image.

    devoid-client "a lighthouse at dusk" [--executor automatic1111] [--output out.jpg]

It connects privately (`?receive=own`): it only ever sees its own request, never the results
waiting for the service's bots. Ctrl-C or --timeout cancels the request. The server's address
comes from --url, else DEVOID_URL, else API_HOST/API_PORT (environment or .env) as the
server reads them; `host:port` and `ws://` URLs work too, and the client adds `/ws/<service>`
itself. Images are saved as <object_id>.jpg under --output-dir (default data/client-images,
which git ignores) unless --output names the file. With --json, stdout carries one JSON object
per event (queued, generating, progress, eta, retrying, no_backend, saved, error) for scripts.

Exit status: 0 saved, 1 the request ended in an error (or timed out, or was cancelled),
2 refused (wrong key or service), 3 the server could not be reached or the connection broke,
130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from dotenv import dotenv_values, find_dotenv

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
BAR_WIDTH = 24
# How long a cancel (on Ctrl-C or --timeout) may wait for the server's answer.
CANCEL_ANSWER_TIMEOUT_S = 3.0
# The server's own defaults (app/config.py), for when neither the environment nor .env say.
DEFAULT_API_HOST, DEFAULT_API_PORT = "127.0.0.1", "8080"
DEFAULT_OUTPUT_DIR = Path("data/client-images")
# The websocket path at the end of a pasted URL: `.../ws` or `.../ws/<service>`.
_WS_SUFFIX = re.compile(r"(^|/)ws(/[^/]*)?$")


def server_url(raw: str) -> str:
    """The server's base URL from what a person types: `host:port` gets http://, ws:// and
    wss:// become http:// and https://, and a trailing /ws or /ws/<service> is dropped (the
    client adds it). Raises ValueError for anything else that is not http(s)."""
    url = raw.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("http", "https") or not rest:
        raise ValueError(f"expected a server address such as http://127.0.0.1:8080, got {raw!r}")
    host, _, path = rest.partition("/")
    path = _WS_SUFFIX.sub("", path)
    return f"{scheme}://{host}{'/' + path if path else ''}"


class ClientError(Exception):
    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def default_url(environ: Mapping[str, str], dotenv: Mapping[str, str | None]) -> str:
    """DEVOID_URL, else the server's API_HOST/API_PORT (environment first, then .env, as the
    server reads them); a wildcard listen address is reached on loopback."""
    if environ.get("DEVOID_URL"):
        return environ["DEVOID_URL"]

    def setting(name: str, default: str) -> str:
        return environ.get(name) or dotenv.get(name) or default

    host = setting("API_HOST", DEFAULT_API_HOST)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{setting('API_PORT', DEFAULT_API_PORT)}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description kept as written; each option's default shown when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(prog="devoid-client", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--executor", choices=["kandinsky", "automatic1111"], default="kandinsky", help="backend type to use"
    )
    parser.add_argument(
        "--gen-type", choices=["text2img"], default="text2img", help="only text2img from the command line"
    )
    parser.add_argument("--premium", action="store_true", help="send as a premium request")
    parser.add_argument("--steps", type=int, help="sampling steps (the backend's default if left out)")
    parser.add_argument("--width", type=int, help="pixels (the backend's default if left out)")
    parser.add_argument("--height", type=int, help="pixels (the backend's default if left out)")
    parser.add_argument(
        "--url",
        default=default_url(os.environ, dotenv_values(find_dotenv(usecwd=True))),
        help="server address (from DEVOID_URL, else API_HOST/API_PORT in the environment or .env)",
    )
    parser.add_argument(
        "--service", default=os.environ.get("DEVOID_SERVICE", "test"), help="service name (env DEVOID_SERVICE)"
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("DEVOID_KEY", "demo-key"),
        help="service key (env DEVOID_KEY); the default is TEST_MODE's demo key",
    )
    parser.add_argument("--output", type=Path, help="file to save the image as (instead of --output-dir)")
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="folder for <object_id>.jpg, created if needed"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up (and cancel the request) after this long"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per event on stdout, for scripts")
    args = parser.parse_args(argv)
    try:
        args.url = server_url(args.url)
    except ValueError as exc:
        parser.error(f"--url: {exc}")
    return args


def request_message(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {"prompt": args.prompt}
    for name in ("steps", "width", "height"):
        if getattr(args, name) is not None:
            payload[name] = getattr(args, name)
    return {
        "message_type": "request",
        "executor": args.executor,
        "gen_type": args.gen_type,
        "settings": {"premium": int(args.premium), "moderate": 0, "sync_with_s3": 1},
        "service_info": {"user_id": 0, "client": "app.client", "request_id": f"cli-{uuid.uuid4()}"},
        "payload": payload,
    }


class ProgressView:
    """One status line, redrawn in place on a terminal, a line per change otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""

    def message(self, message: dict[str, Any]) -> None:
        """A message about our request."""
        line = describe(message)
        if line:
            self.show(line)

    def finished(self, path: Path | None, error: ClientError | None) -> None:
        self.done()
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
        else:
            print(f"saved {path}")

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


class JsonView:
    """--json: one JSON object per event on stdout (`event` names it), nothing on stderr."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _emit(self, event: dict[str, Any]) -> None:
        self._stream.write(json.dumps(event) + "\n")
        self._stream.flush()

    def message(self, message: dict[str, Any]) -> None:
        if message.get("message_type") == "response":
            event = {"event": message["gen_status"], "object_id": message["object_id"]}
            if message["gen_status"] in ("queued", "generating"):
                event["avg_time"] = message.get("avg_time")
            self._emit(event)
        elif message.get("info_type") in ("progress", "eta", "retrying", "no_backend"):
            fields = ("progress", "eta_relative", "eta_s", "attempt", "retry_in_s", "content")
            self._emit(
                {"event": message["info_type"], "object_id": message.get("object_id")}
                | {name: message[name] for name in fields if name in message}
            )

    def show(self, text: str) -> None:
        pass  # the object_id line: the first event carries it

    def done(self) -> None:
        pass

    def finished(self, path: Path | None, error: ClientError | None) -> None:
        if error is not None:
            self._emit({"event": "error", "message": str(error), "exit_status": error.exit_status})
        else:
            self._emit({"event": "saved", "path": str(path)})


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
        return f"generating [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}" + (
            f" ETA {eta:.1f} s" if eta is not None else ""
        )
    if info_type in ("retrying", "no_backend"):
        return f"{info_type}: {message['content']}"
    return None


async def generate(args: argparse.Namespace, view: ProgressView | JsonView) -> Path:
    """Send the request, follow it, save the image. Raises ClientError."""
    ws_url = args.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    headers = {"authorization": args.key, "service": args.service}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(
                f"{ws_url}/ws/{args.service}", headers=headers, params={"receive": "own"}, max_msg_size=64 * 1024 * 1024
            ) as ws:
                request = request_message(args)
                await ws.send_json(request)
                final = await follow(ws, view, request["service_info"]["request_id"], args.timeout)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise ClientError(
                    f"the server refused service {args.service!r} with this key (HTTP 401)", EXIT_REFUSED
                ) from None
            raise ClientError(f"the server refused the connection (HTTP {exc.status})", EXIT_UNREACHABLE) from None
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach the server at {args.url}: {exc}", EXIT_UNREACHABLE) from None
        if final["gen_status"] != "ok":
            raise ClientError(f"the request failed: {final['result']['content']}", EXIT_FAILED)
        return await save(session, final, args.output or args.output_dir / f"{final['object_id']}.jpg")


class Interrupted(ClientError):
    """Ctrl-C: the request was cancelled (or could not be)."""


async def follow(
    ws: aiohttp.ClientWebSocketResponse, view: ProgressView | JsonView, request_id: str, timeout_s: float | None
) -> dict[str, Any]:
    """Follow our request to its final answer. Only our own request's messages come on this
    private connection; each is still matched by object_id (taken from the answer that echoes
    our request_id)."""
    state: dict[str, Any] = {"object_id": None}
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_until_final(ws, view, request_id, state)
    except TimeoutError:
        outcome = await _cancel(ws, state["object_id"])
        raise ClientError(f"no answer within {timeout_s:g} s; {outcome}", EXIT_FAILED) from None
    except asyncio.CancelledError:  # Ctrl-C
        outcome = await _cancel(ws, state["object_id"])
        raise Interrupted(f"interrupted; {outcome}", EXIT_INTERRUPTED) from None


async def _read_until_final(
    ws: aiohttp.ClientWebSocketResponse, view: ProgressView | JsonView, request_id: str, state: dict[str, Any]
) -> dict[str, Any]:
    async for frame in ws:
        if frame.type is not aiohttp.WSMsgType.TEXT:
            break
        message = json.loads(frame.data)
        if message.get("message_type") == "info" and message.get("info_type") == "error":
            raise ClientError(f"the server refused the message: {message['content']}", EXIT_FAILED)
        if (
            state["object_id"] is None
            and message.get("message_type") == "response"
            and message.get("service_info", {}).get("request_id") == request_id
        ):
            state["object_id"] = message["object_id"]
            view.show(f"object_id {state['object_id']}")
        if state["object_id"] is None or message.get("object_id") != state["object_id"]:
            continue
        view.message(message)
        if message.get("gen_status") in ("ok", "error"):
            view.done()
            return message
    raise ClientError("the connection closed before the request finished", EXIT_UNREACHABLE)


async def _cancel(ws: aiohttp.ClientWebSocketResponse, object_id: str | None) -> str:
    """Cancel our request; a few words on how that went."""
    if object_id is None:
        return "the request had not been acknowledged yet"
    try:
        async with asyncio.timeout(CANCEL_ANSWER_TIMEOUT_S):
            await ws.send_json({"message_type": "info", "action": "cancel", "object_id": object_id})
            async for frame in ws:
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(frame.data)
                if message.get("info_type") == "cancel" and message.get("object_id") == object_id:
                    if message.get("outcome") == "cancelled":
                        return f"request {object_id} cancelled"
                    return f"request {object_id} not cancelled: {message['content']}"
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        pass
    return f"request {object_id} may still run (the cancel was not answered)"


async def save(session: aiohttp.ClientSession, final: dict[str, Any], path: Path) -> Path:
    result = final["result"]
    if result["content_type"] == "base64":
        data = base64.b64decode(result["content"])
    else:
        try:
            async with session.get(result["content"]) as response:
                if response.status != 200:
                    raise ClientError(f"the image at {result['content']} answered HTTP {response.status}", EXIT_FAILED)
                data = await response.read()
        except aiohttp.ClientError as exc:
            raise ClientError(f"cannot download {result['content']}: {exc}", EXIT_UNREACHABLE) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise ClientError(f"cannot save the image as {path}: {exc.strerror}", EXIT_FAILED) from None
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    view: ProgressView | JsonView = JsonView(sys.stdout) if args.json else ProgressView(sys.stderr)
    outcome: list[ClientError] = []

    async def run() -> Path | None:
        try:
            return await generate(args, view)
        except ClientError as exc:
            outcome.append(exc)  # kept: on Ctrl-C asyncio.run raises KeyboardInterrupt after us
            return None

    try:
        path = asyncio.run(run())
    except KeyboardInterrupt:
        path = None
        if not outcome:
            outcome.append(Interrupted("interrupted", EXIT_INTERRUPTED))
    view.finished(path, outcome[0] if outcome else None)
    return outcome[0].exit_status if outcome else EXIT_OK


def console_main() -> None:
    """The `devoid-client` command."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
