"""Status page reads: the latency of GET /status.json with the 20 most recent requests being
img2img requests of an 8 MB image each (the page lists them; it must not read their images).

Usage: .venv/bin/python -m bench.status [--polls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.core import demo_server
from bench.restart import create_schema, fill

RECENT = 20
IMAGE_BYTES = 8_000_000


async def poll_status(path: Path, workdir: Path, polls: int) -> list[float]:
    server = demo_server(workdir, path, DEMO_DELAY_S="60", MAX_QUEUE_WAIT_S="86400")
    await server.start()
    try:
        timings = []
        async with aiohttp.ClientSession() as session:
            for _ in range(polls):
                started = time.perf_counter()
                async with session.get(f"{server.base_url}/status.json") as response:
                    await response.read()
                timings.append((time.perf_counter() - started) * 1000)
        return timings
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        path = workdir / "recent.sqlite3"
        asyncio.run(create_schema(path))
        fill(path, RECENT, IMAGE_BYTES)
        timings = asyncio.run(poll_status(path, workdir, args.polls))
    print(
        f"GET /status.json with {RECENT} recent 8 MB img2img requests, {args.polls} polls: "
        f"median {statistics.median(timings):.1f} ms, max {max(timings):.1f} ms"
    )


if __name__ == "__main__":
    main()
