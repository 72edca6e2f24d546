"""One instant AUTOMATIC1111 demo backend in a process of its own, for dispatch-gap figures
with several backends: served from the bench's own process, eight backends and their clients
share one event loop, and that loop is what gets measured.

It prints its URL on the first line, holds every request until `POST /bench/open`, and answers
`GET /bench/gaps` with the milliseconds between each response and its next request
(time.monotonic is one clock for every process on the machine).

Usage (by bench/core.py): python -m bench.gap_backend
"""

from __future__ import annotations

import asyncio
import itertools

from aiohttp import web

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback


async def main() -> None:
    state = DemoBackendState()
    state.gate.clear()
    app = automatic1111_app(state)

    async def open_gate(_: web.Request) -> web.Response:
        state.gate.set()
        return web.json_response({"open": True})

    async def gaps(_: web.Request) -> web.Response:
        calls = list(state.received)
        return web.json_response(
            [(later.started_at - earlier.finished_at) * 1000 for earlier, later in itertools.pairwise(calls)]
        )

    app.router.add_post("/bench/open", open_gate)
    app.router.add_get("/bench/gaps", gaps)
    runner, url = await serve_on_loopback(app)
    print(url, flush=True)
    try:
        await asyncio.Event().wait()  # until the bench terminates the process
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
