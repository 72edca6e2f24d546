"""Demo GPU servers that speak the real HTTP contracts of the backends (docs/backends.md).

TEST_MODE=1 serves them on a loopback port and sends requests to them through the same
scheduler and HTTP clients as real backends. The tests use them as their backends too:
`DemoBackendState` records what each one received and can hold requests at a gate.
They draw a real image with Pillow after `delay_s`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import collections.abc
import contextlib
import hashlib
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw

from app.domain.costs import payload_cost_units
from app.domain.jobs import ExecutorType, GenType

# Demo images are drawn small whatever size was asked for: they show the flow, not art.
MAX_DEMO_SIDE_PX = 256
DEMO_SHUTDOWN_TIMEOUT_S = 0.5


@dataclass
class ReceivedCall:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    finished_at: float | None = None


@dataclass
class DemoBackendState:
    """What a demo backend does and has seen.

    delay_s      seconds per image; with `units_per_s` set, the job's cost / units_per_s
                 instead (a GPU of that speed, app/domain/costs.py)
    gate         cleared = generation calls wait until it is set
    fail_status  set = generation calls are answered with that status and `fail_body`
    probe_status the health routes' status (503 = the probe fails)
    """

    delay_s: float = 0.0
    units_per_s: float | None = None
    # With units_per_s: each duration is scaled by a factor drawn from [1 - noise, 1 + noise]
    # (seeded by noise_seed, so a benchmark replays the same run).
    noise: float = 0.0
    noise_seed: int = 0
    api_token: str = ""
    fail_status: int | None = None
    fail_body: dict[str, Any] = field(default_factory=dict)
    probe_status: int = 200
    # Every call, for tests to inspect; with keep_received, only that many of the latest (the
    # demo backends of TEST_MODE run for days: their memory must not grow with every request).
    received: collections.abc.MutableSequence[ReceivedCall] = field(default_factory=list)
    keep_received: int | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    max_running: int = 0
    current_started: float = 0.0
    current_duration_s: float = 0.0
    interrupts: int = 0

    def __post_init__(self) -> None:
        if self.keep_received is not None:
            self.received = collections.deque(self.received, maxlen=self.keep_received)
        self.gate.set()
        self.random = random.Random(self.noise_seed)


STATE = web.AppKey("demo_backend_state", DemoBackendState)


def draw_image(prompt: str, width: int, height: int, image_format: str) -> bytes:
    """A real image: a colour taken from the prompt, with the prompt written on it."""
    colour = tuple(hashlib.sha256(prompt.encode()).digest()[:3])
    scale = min(1.0, MAX_DEMO_SIDE_PX / max(width, height, 1))
    size = (max(8, int(width * scale)), max(8, int(height * scale)))
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).text((4, 4), prompt[:40], fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


_GEN_TYPES = {
    "/sdapi/v1/txt2img": (ExecutorType.AUTOMATIC1111, GenType.TEXT2IMG),
    "/sdapi/v1/img2img": (ExecutorType.AUTOMATIC1111, GenType.IMG2IMG),
    "/text2img": (ExecutorType.KANDINSKY, GenType.TEXT2IMG),
    "/mix2images": (ExecutorType.KANDINSKY, GenType.MIX2IMG),
}


def _duration_s(state: DemoBackendState, path: str, body: dict[str, Any]) -> float:
    if state.units_per_s:
        factor = state.random.uniform(1 - state.noise, 1 + state.noise) if state.noise else 1.0
        return payload_cost_units(*_GEN_TYPES[path], body) / state.units_per_s * factor
    return state.delay_s


async def _generate(request: web.Request, render: Callable[[dict[str, Any]], web.Response]) -> web.Response:
    """Record the call, take the time a generation takes, then answer with `render(body)`
    (or with the configured failure)."""
    state = request.app[STATE]
    body = json.loads(await request.text())
    call = ReceivedCall(
        path=request.path,
        body=body,
        headers={k.lower(): v for k, v in request.headers.items()},
        started_at=time.monotonic(),
    )
    state.received.append(call)
    # Like the real servers, one generation runs at a time; the balancer is meant to see to
    # that, and max_running lets the tests check that it did.
    state.running += 1
    state.max_running = max(state.max_running, state.running)
    try:
        await state.gate.wait()
        state.current_started = time.monotonic()
        state.current_duration_s = _duration_s(state, request.path, body)
        state.interrupted.clear()
        if state.current_duration_s:
            # /sdapi/v1/interrupt ends the wait early, as it stops a real sampler.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(state.current_duration_s):
                    await state.interrupted.wait()
    finally:
        state.running -= 1
        state.current_duration_s = 0.0
    if state.fail_status is not None:
        response = web.json_response(state.fail_body, status=state.fail_status)
    else:
        response = render(body)
    call.finished_at = time.monotonic()
    return response


def _prompt_of(body: dict[str, Any]) -> str:
    if body.get("images_texts"):
        return " + ".join(item for item in body["images_texts"] if isinstance(item, str) and len(item) < 200)
    return str(body.get("prompt", ""))


# -- AUTOMATIC1111 ---------------------------------------------------------------------


def _undecodable_image(body: dict[str, Any]) -> str | None:
    """Like the real server, img2img decodes its init_images; the reason if one fails."""
    for image in body.get("init_images") or []:
        data = image.split(",", 1)[1] if isinstance(image, str) and image.startswith("data:") else image
        try:
            with Image.open(io.BytesIO(base64.b64decode(data))) as decoded:
                decoded.load()
        except Exception as exc:  # anything PIL cannot read
            return f"Invalid encoded image: {type(exc).__name__}"
    return None


def _a1111_answer(body: dict[str, Any]) -> web.Response:
    png = draw_image(_prompt_of(body), body.get("width") or 512, body.get("height") or 512, "PNG")
    return web.json_response(
        {
            "images": [base64.b64encode(png).decode()],
            "parameters": body,
            "info": json.dumps({"prompt": body.get("prompt", ""), "seed": body.get("seed", -1)}),
        }
    )


async def _a1111_generate(request: web.Request) -> web.Response:
    def answer(body: dict[str, Any]) -> web.Response:
        reason = _undecodable_image(body) if request.path.endswith("/img2img") else None
        if reason is not None:
            # What the real server answers: a 500, although the request is at fault.
            return web.json_response(
                {"error": "ValueError", "detail": reason, "body": "", "errors": reason}, status=500
            )
        return _a1111_answer(body)

    return await _generate(request, answer)


async def _a1111_memory(request: web.Request) -> web.Response:
    return web.json_response(
        {"ram": {"free": 1, "used": 1, "total": 2}, "cuda": {"system": {"free": 1, "used": 1, "total": 2}}},
        status=request.app[STATE].probe_status,
    )


async def _a1111_ping(request: web.Request) -> web.Response:
    return web.json_response({}, status=request.app[STATE].probe_status)


async def _a1111_progress(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fraction, eta = 0.0, 0.0
    if state.running and state.current_duration_s:
        elapsed = time.monotonic() - state.current_started
        fraction = min(1.0, elapsed / state.current_duration_s)
        eta = max(0.0, state.current_duration_s - elapsed)
    return web.json_response(
        {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": state.interrupted.is_set(),
                "job": "",
                "job_count": state.running,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": int(fraction * 20),
                "sampling_steps": 20,
            },
            "current_image": None,
            "textinfo": None,
        }
    )


async def _a1111_interrupt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.interrupts += 1
    state.interrupted.set()
    return web.json_response({})


def automatic1111_app(state: DemoBackendState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/sdapi/v1/txt2img", _a1111_generate)
    app.router.add_post("/sdapi/v1/img2img", _a1111_generate)
    app.router.add_get("/sdapi/v1/memory", _a1111_memory)
    app.router.add_get("/internal/ping", _a1111_ping)
    app.router.add_get("/sdapi/v1/progress", _a1111_progress)
    app.router.add_post("/sdapi/v1/interrupt", _a1111_interrupt)
    return app


# -- Kandinsky -------------------------------------------------------------------------


def _kandinsky_answer(body: dict[str, Any]) -> web.Response:
    jpeg = draw_image(_prompt_of(body), body.get("width") or 512, body.get("height") or 512, "JPEG")
    return web.Response(body=jpeg, content_type="image/jpg")


async def _kandinsky_generate(request: web.Request) -> web.Response:
    if request.headers.get("authorization", "") != request.app[STATE].api_token:
        return web.json_response({"detail": "Invalid token"}, status=401)
    return await _generate(request, _kandinsky_answer)


async def _kandinsky_root(request: web.Request) -> web.Response:
    return web.json_response(
        {"RestAPI": "Kandinskiy 2.1 Model", "website": "demo"}, status=request.app[STATE].probe_status
    )


def kandinsky_app(state: DemoBackendState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_get("/", _kandinsky_root)
    app.router.add_post("/text2img", _kandinsky_generate)
    app.router.add_post("/mix2images", _kandinsky_generate)
    return app


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve a demo backend on a free 127.0.0.1 port. Returns its runner (clean it up when
    done) and its base URL."""
    # A demo generation still running at shutdown is not waited for (SHUTDOWN_GRACE_S is the
    # balancer's to spend, not the demo's).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=DEMO_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
