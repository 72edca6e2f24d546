"""Core service numbers: accepted requests per second over one websocket (durability on), and
the gap between a backend finishing and receiving its next request.

Runs the real server as a subprocess (`python -m app`) against instant test backends served
from this process. Each number is printed beside a baseline measured in the same run:

- accept rate with group commit vs. with STORE_BATCH_ROWS=1 (one commit per request), and
  pipelined vs. one-request-at-a-time sending;
- dispatch gap through the balancer, with 1 and with 8 backends (each in a process of its own,
  bench/gap_backend.py), vs. the floor peer (bench/dispatch_floor.py: the least a durable
  balancer does per job, by hand) and vs. a client loop per backend, in one process, calling
  it directly (no durability at all).

Usage: .venv/bin/python -m bench.core [--requests N] [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
from aiohttp import web

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from app.storage.group_commit import MAX_BATCH_ROWS
from bench.processes import REPO_ROOT, ServerProcess, wait_until_answering
from bench.sampling import cpu_seconds

KEY = "bench-key"


def request(prompt: str) -> str:
    return json.dumps(
        {
            "message_type": "request",
            "executor": "automatic1111",
            "gen_type": "text2img",
            "settings": {"premium": 0},
            "service_info": {"user_id": 1},
            "payload": {"prompt": prompt, "steps": 20},
        }
    )


async def start_backend(state: DemoBackendState) -> tuple[web.AppRunner, str]:
    return await serve_on_loopback(automatic1111_app(state))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A benchmark's load comes from one bot and one user at thousands of requests/s: the limits a
# real deployment keeps on (MAX_USER_REQUESTS, ...) are lifted, or they would be what is measured.
NO_LIMITS = {"MAX_USER_REQUESTS": "0", "MAX_SERVICE_REQUESTS": "0", "SERVICE_RATE_PER_S": "0", "MAX_JOB_UNITS": "0"}


def demo_server(workdir: Path, database: Path, **env: str) -> ServerProcess:
    """`python -m app` in TEST_MODE (demo backends) on a free port, data under `workdir`; not
    started yet. `env` adds or overrides settings."""
    return ServerProcess(
        {
            "TEST_MODE": "1",
            "SERVICES": "",
            "API_HOST": "127.0.0.1",
            "API_PORT": str(free_port()),
            "DATABASE_PATH": str(database),
            "IMAGES_PATH": str(workdir / "images"),
            **NO_LIMITS,
            **env,
        },
        workdir / "server.log",
        cwd=workdir,
    )


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc: VmRSS (now) or VmHWM (peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def balancer(folder: Path, backends: list[dict], **env: str) -> ServerProcess:
    """The balancer as a process (not started yet) on a free port, with the bench service and
    `backends` as its executors file; its data under `folder`. `env` adds or overrides settings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "executors.json").write_text(json.dumps(backends))
    return ServerProcess(
        {
            "API_PORT": str(free_port()),
            "SERVICES": f"bench:{KEY}",
            "DATABASE_PATH": str(folder / "db.sqlite3"),
            "EXECUTORS_FILE": str(folder / "executors.json"),
            "IMAGES_PATH": str(folder / "images"),
            **NO_LIMITS,
            **env,
        },
        folder / "server.log",
    )


async def start_server(folder: Path, backend_url: str, **env: str) -> ServerProcess:
    server = balancer(
        folder, [{"name": "gpu", "exec_type": "automatic1111", "endpoint": backend_url, "timeout": 60}], **env
    )
    await server.start()
    return server


async def accept_rate(folder: Path, count: int, pipelined: bool, **env: str) -> float:
    """Requests per second from first send to last `queued`, over one connection. The backend
    holds every job (gate closed) so only accepting is measured."""
    state = DemoBackendState()
    state.gate.clear()
    runner, url = await start_backend(state)
    server = await start_server(folder, url, **env)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"{server.base_url}/ws/bench", headers={"authorization": KEY, "service": "bench"}
            ) as ws:
                started = time.perf_counter()
                if pipelined:
                    sender = asyncio.create_task(_send_all(ws, count))
                    await _await_queued(ws, count)
                    await sender
                else:
                    for index in range(count):
                        await ws.send_str(request(f"r{index}"))
                        await _await_queued(ws, 1)
                elapsed = time.perf_counter() - started
    finally:
        await server.stop()
        state.gate.set()
        await runner.cleanup()
    return count / elapsed


async def _send_all(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
    for index in range(count):
        await ws.send_str(request(f"r{index}"))


async def _await_queued(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
    seen = 0
    while seen < count:
        message = json.loads((await ws.receive()).data)
        if message.get("gen_status") == "queued":
            seen += 1
        elif message.get("gen_status") == "error":
            raise RuntimeError(message)


def quantile(ordered: list[float], share: float) -> float:
    """The value `share` of the way up `ordered` (sorted, not empty): the one at index
    share x count, the last for 1.0. What every bench here prints as p90 / p99."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered):6.2f} ms   p99 {quantile(ordered, 0.99):6.2f} ms   (n={len(ordered)})"


class GapBackends:
    """`count` instant demo backends, each in a process of its own (bench/gap_backend.py), that
    hold every request until opened and then report their gaps."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []

    async def __aenter__(self) -> GapBackends:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)}
        for _ in range(self.count):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.gap_backend", cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE
            )
            self.processes.append(process)
            assert process.stdout is not None
            self.urls.append((await process.stdout.readline()).decode().strip())
        return self

    async def __aexit__(self, *_: object) -> None:
        for process in self.processes:
            process.terminate()
            await process.wait()

    async def open(self, session: aiohttp.ClientSession) -> None:
        for url in self.urls:
            async with session.post(f"{url}/bench/open") as response:
                response.raise_for_status()

    async def gaps(self, session: aiohttp.ClientSession, skip_first: bool) -> list[float]:
        gaps: list[float] = []
        for url in self.urls:
            async with session.get(f"{url}/bench/gaps") as response:
                measured = await response.json()
            gaps += measured[1:] if skip_first else measured  # the first call waited at the gate
        return gaps


class GapRun(NamedTuple):
    gaps: list[float]  # ms, on each backend from each response to its next call
    cpu_ms_per_job: float  # the server's CPU per job while it dispatched them, all threads
    loop_ms_per_job: float  # the part of it in the event loop's thread


async def dispatch_gaps(folder: Path, jobs: int, backends: int = 1) -> GapRun:
    """A backlog of `jobs` on `backends` instant backends: on each backend, the time from each
    response to its next call, and what the server's CPU did meanwhile. With one backend
    nothing is shared between jobs (each has its claim and result committed, its image
    converted and stored): the CPU per job says how much of the machine's two cores the
    server itself takes from the backend and the client between two calls."""
    async with GapBackends(backends) as gpus, aiohttp.ClientSession() as session:
        entries = [
            {"name": f"gpu{number}", "exec_type": "automatic1111", "endpoint": url, "timeout": 60}
            for number, url in enumerate(gpus.urls)
        ]
        server = balancer(folder, entries, SAVE_IMAGES_LOCALLY="1")
        await server.start()
        try:
            async with session.ws_connect(
                f"{server.base_url}/ws/bench", headers={"authorization": KEY, "service": "bench"}
            ) as ws:
                cpu_ms, loop_ms = await _run_backlog(ws, gpus, session, server.process.pid, jobs)
        finally:
            await server.stop()
        return GapRun(await gpus.gaps(session, skip_first=True), cpu_ms, loop_ms)


async def _run_backlog(
    ws: aiohttp.ClientWebSocketResponse, gpus: GapBackends, session: aiohttp.ClientSession, pid: int, jobs: int
) -> tuple[float, float]:
    """`jobs` requests queued through `ws` while the backends hold them, then the backends
    opened and every final awaited: process `pid`'s CPU per job meanwhile, in ms (all threads,
    the event loop's thread alone)."""
    await _send_all(ws, jobs)
    await _await_queued(ws, jobs)
    cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    await gpus.open(session)
    done = 0
    while done < jobs:
        message = json.loads((await ws.receive()).data)
        done += message.get("gen_status") in ("ok", "error")
    cpu, loop_cpu = cpu_seconds(pid) - cpu_before, cpu_seconds(pid, thread=pid) - loop_before
    return cpu / jobs * 1000, loop_cpu / jobs * 1000


@contextlib.asynccontextmanager
async def floor_peer(folder: Path, backend_urls: list[str]) -> AsyncIterator[tuple[int, str]]:
    """bench/dispatch_floor.py, the least a durable balancer does per request, in a process of
    its own calling `backend_urls`: (its pid, its websocket URL) while the context lasts."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)}
    floor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.dispatch_floor", str(port), str(folder), *backend_urls, cwd=REPO_ROOT, env=env
    )
    try:
        await wait_until_answering(f"http://127.0.0.1:{port}", lambda: None)
        yield floor.pid, f"http://127.0.0.1:{port}/ws"
    finally:
        floor.terminate()
        await floor.wait()


async def floor_gaps(folder: Path, jobs: int, backends: int = 1) -> GapRun:
    """The backlog of dispatch_gaps through the floor peer (floor_peer): the gap and the CPU
    per job that the least durable work per job leaves."""
    async with GapBackends(backends) as gpus, aiohttp.ClientSession() as session:
        async with floor_peer(folder, gpus.urls) as (pid, ws_url), session.ws_connect(ws_url) as ws:
            cpu_ms, loop_ms = await _run_backlog(ws, gpus, session, pid, jobs)
        return GapRun(await gpus.gaps(session, skip_first=True), cpu_ms, loop_ms)


async def direct_gaps(jobs: int, backends: int = 1) -> list[float]:
    """Baseline: one client loop per backend, all in this process, calling it back to back
    with no balancer in between."""
    async with GapBackends(backends) as gpus, aiohttp.ClientSession() as session:
        await gpus.open(session)

        async def loop(url: str, count: int) -> None:
            for index in range(count):
                async with session.post(
                    f"{url}/sdapi/v1/txt2img", data=json.dumps({"prompt": f"r{index}", "steps": 20})
                ) as response:
                    await response.read()

        await asyncio.gather(*(loop(url, jobs // backends) for url in gpus.urls))
        return await gpus.gaps(session, skip_first=False)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(
            f"accepted requests/s over one websocket, {args.requests} requests, durability on "
            "(each committed before its `queued`)"
        )
        grouped = await accept_rate(root / "grouped", args.requests, pipelined=True)
        print(f"  pipelined, group commit (STORE_BATCH_ROWS={MAX_BATCH_ROWS}): {grouped:8.0f} req/s")
        single = await accept_rate(root / "single", args.requests, pipelined=True, STORE_BATCH_ROWS="1")
        print(
            f"  pipelined, one commit each (STORE_BATCH_ROWS=1): {single:8.0f} req/s   "
            f"(group commit x{grouped / single:.1f})"
        )
        sequential = await accept_rate(root / "sequential", min(args.requests, 1000), pipelined=False)
        print(f"  one at a time (send, wait for queued):          {sequential:8.0f} req/s")

        for backends in (1, 8):
            print(
                f"\ngap between a backend's response and its next request, backlog of {args.jobs} "
                f"jobs on {backends} instant backend{'s' if backends > 1 else ''}"
            )
            through = await dispatch_gaps(root / f"gaps-{backends}", args.jobs, backends)
            print(
                f"  through the balancer:          {summary(through.gaps)}   server CPU per job "
                f"{through.cpu_ms_per_job:.2f} ms (event loop {through.loop_ms_per_job:.2f} ms)"
            )
            floor = await floor_gaps(root / f"floor-{backends}", args.jobs, backends)
            print(
                f"  floor peer (dispatch_floor):   {summary(floor.gaps)}   its CPU per job "
                f"{floor.cpu_ms_per_job:.2f} ms (event loop {floor.loop_ms_per_job:.2f} ms)"
            )
            baseline = await direct_gaps(args.jobs, backends)
            print(f"  baseline, direct client loops: {summary(baseline)}")


if __name__ == "__main__":
    asyncio.run(main())
