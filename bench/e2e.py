"""End-to-end job throughput: no-op jobs per second through the whole balancer (accept ->
commit -> dispatch -> instant backend -> image stored -> `ok` delivered), with 8 instant
AUTOMATIC1111 test backends, beside the floor peer (bench/dispatch_floor.py: the least a
durable balancer does per request, by hand, through the same backends) and huey running no-op
tasks (bench/huey_peer.py) in the same run. Repeats interleaved; min / median / max. Then the
CPU each job costs: the server's and the floor's (all threads, and the event loop alone), the
load's (this process: the backends and the client share the machine), and one image file
stored the way results are, alone, which no server code can lower; from these, the most
jobs/s the machine's cores allow, with this server and with a server that cost nothing (the
load alone).

Usage: .venv/bin/python -m bench.e2e [--jobs N] [--repeats N] [--profile]
  --profile: one extra run sampled by py-spy; self time, and the event loop's inclusive time,
             per function.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from app.storage.results import image_file_name, write_atomically
from bench.core import KEY, balancer, floor_peer
from bench.sampling import PY_SPY_MISSING, Sampler, cpu_seconds, print_loop_profile

BACKENDS = 8


@dataclasses.dataclass
class Run:
    jobs_per_s: float
    cpu_ms_per_job: float  # all of the server's threads
    loop_ms_per_job: float  # the event loop's thread alone
    load_ms_per_job: float  # this bench process: the 8 backends and the client


def request_texts(jobs: int) -> list[str]:
    return [
        json.dumps(
            {
                "message_type": "request",
                "executor": "automatic1111",
                "gen_type": "text2img",
                "settings": {},
                "service_info": {"user_id": n},
                "payload": {"prompt": f"p{n}", "steps": 1, "width": 64, "height": 64},
            }
        )
        for n in range(jobs)
    ]


@contextlib.asynccontextmanager
async def instant_backends() -> AsyncIterator[list[str]]:
    """BACKENDS instant AUTOMATIC1111 demo backends served from this process: their URLs."""
    runners, urls = [], []
    try:
        for _ in range(BACKENDS):
            runner, url = await serve_on_loopback(automatic1111_app(DemoBackendState()))
            runners.append(runner)
            urls.append(url)
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def drive(ws: aiohttp.ClientWebSocketResponse, pid: int, jobs: int) -> Run:
    """Send `jobs` requests down `ws` while reading its answers, until each has its final."""
    texts = request_texts(jobs)
    cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    load_before = time.process_time()
    started = time.perf_counter()

    async def send() -> None:
        for text in texts:
            await ws.send_str(text)

    sender = asyncio.create_task(send())
    finals = 0
    while finals < jobs:
        data = (await ws.receive()).data
        if '"gen_status":"ok"' in data or '"gen_status":"error"' in data:
            finals += 1
    await sender
    elapsed = time.perf_counter() - started
    return Run(
        jobs / elapsed,
        (cpu_seconds(pid) - cpu_before) * 1000 / jobs,
        (cpu_seconds(pid, thread=pid) - loop_before) * 1000 / jobs,
        (time.process_time() - load_before) * 1000 / jobs,
    )


async def balancer_run(folder: Path, jobs: int, profile_to: Path | None = None) -> Run:
    async with instant_backends() as urls:
        specs = [
            {"name": f"gpu{number}", "exec_type": "automatic1111", "endpoint": url, "timeout": 60}
            for number, url in enumerate(urls)
        ]
        server = balancer(folder, specs)
        await server.start()
        sampler = Sampler(server.process.pid, profile_to) if profile_to is not None else None
        try:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(
                    f"{server.base_url}/ws/bench", max_msg_size=0, headers={"authorization": KEY, "service": "bench"}
                ) as ws:
                    return await drive(ws, server.process.pid, jobs)
        finally:
            if sampler is not None:
                sampler.stop()
            await server.stop()


async def floor_run(folder: Path, jobs: int) -> Run:
    """The same jobs through the floor peer (bench/dispatch_floor.py): the least a durable
    balancer does per request, by hand."""
    async with instant_backends() as urls, floor_peer(folder, urls) as (pid, ws_url):
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            return await drive(ws, pid, jobs)


def huey_rate(folder: Path, jobs: int) -> float | None:
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("huey_peer.py")), str(folder / "huey.sqlite3"), str(jobs)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None  # huey is not installed (pip install -r bench/requirements.txt)
    return float(out.stdout.split()[1])


def image_file_ms(folder: Path, count: int = 500) -> float:
    """CPU per image file written the way every result is stored (app/storage/results.py:
    create, write, fsync, rename, fsync the folder), in this process with nothing else
    running: a floor under each job's cost that no server code can lower."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = bytes(3000)
    started = time.process_time()
    for number in range(count):
        write_atomically(folder / image_file_name(f"{number:024x}"), jpeg)
    return (time.process_time() - started) * 1000 / count


def spread(values: list[float], form: str) -> str:
    return " / ".join(f"{value:6{form}}" for value in (min(values), statistics.median(values), max(values)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="sample one extra run of this server (py-spy)")
    args = parser.parse_args()
    ours: list[Run] = []
    floors: list[Run] = []
    peer = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            ours.append(await balancer_run(Path(tmp) / f"ours{repeat}", args.jobs))
            floors.append(await floor_run(Path(tmp) / f"floor{repeat}", args.jobs))
            rate = huey_rate(Path(tmp), args.jobs)
            if rate is not None:
                peer.append(rate)
    print(f"no-op jobs per second, {args.jobs} jobs, {args.repeats} repeats (min / median / max)")
    print(f"  this server, {BACKENDS} instant backends: {spread([run.jobs_per_s for run in ours], '.0f')}")
    print(f"  floor peer (dispatch_floor):      {spread([run.jobs_per_s for run in floors], '.0f')}")
    if peer:
        print(f"  huey, 1 worker, no-op task:       {spread(peer, '.0f')}")
    else:
        print("  huey: not installed (pip install -r bench/requirements.txt)")
    print("CPU per job, ms (min / median / max)")
    print(f"  this server, all threads:        {spread([run.cpu_ms_per_job for run in ours], '.2f')}")
    print(f"  this server, event loop alone:   {spread([run.loop_ms_per_job for run in ours], '.2f')}")
    print(f"  floor peer, all threads:         {spread([run.cpu_ms_per_job for run in floors], '.2f')}")
    print(f"  floor peer, event loop alone:    {spread([run.loop_ms_per_job for run in floors], '.2f')}")
    print(f"  the load (8 backends, client):   {spread([run.load_ms_per_job for run in ours], '.2f')}")
    with tempfile.TemporaryDirectory() as tmp:
        floor = image_file_ms(Path(tmp))
    print(
        f"  one image file stored, alone:    {floor:6.2f}  (create, write, fsync, rename, fsync the folder: no server code)"
    )
    per_job = statistics.median([run.cpu_ms_per_job + run.load_ms_per_job for run in ours])
    cores = os.cpu_count() or 1
    print(f"  server and load on {cores} cores at this CPU per job: at most {cores * 1000 / per_job:.0f} jobs/s")
    # What this machine allows whatever the server does: the load's own CPU per job.
    load_ms = statistics.median([run.load_ms_per_job for run in ours])
    print(f"  the load alone on {cores} cores (a server costing nothing): at most {cores * 1000 / load_ms:.0f} jobs/s")
    if args.profile:
        if shutil.which("py-spy") is None:
            print(f"--profile: {PY_SPY_MISSING}")
            return
        with tempfile.TemporaryDirectory() as tmp:
            profile = Path(tmp) / "profile.txt"
            await balancer_run(Path(tmp) / "profiled", args.jobs, profile_to=profile)
            print_loop_profile(profile, "this server")


if __name__ == "__main__":
    asyncio.run(main())
