"""Durable intake: accepted requests per second and server CPU per request, this server beside
the hand-written peers of bench/peer_server.py (naive: one commit per request; group: group
commit), over 1 and over 50 websocket connections, and for img2img requests carrying a 1 MB
image; every request committed (synchronous=FULL) before its `queued`. Those connections
pipeline; the `bots50` figure has 50 bots that each send their next request only once the
last one is queued, as most bots do, so nothing a server spends per message is shared. The small figures also
have the `echo` peer, which answers each frame unread and stores nothing: what aiohttp itself
costs per message, the floor of any server here. The image figure also
has the `files` peer: the least work such a request needs (parse once, check the image, write
the frame to a file and fsync it, commit a row), the floor on this machine. The `mirrored`
figure is this server over 1 connection with the MongoDB mirror on and off: each request's
record for MongoDB is committed with it (tests/mongo_server.py plays MongoDB, in a process of
its own).

Repeats are interleaved (this server, naive, group, this server, ...) so a slow minute of the
machine hits every contestant. Printed per figure: min / median / max over the repeats (server
CPU also for the event loop's thread alone: with 2 cores, that thread bounds the rate), and how
this server answered others while it took the requests: `GET /health` asked every 50 ms from
outside, and its own event loop lag probe (devoid_event_loop_lag_seconds, by bucket). With
--profile (needs py-spy), one extra run of this server per kind of request is sampled and its
hottest layers and functions printed, and the group-commit peer's beside them (50 connections).

Usage: .venv/bin/python -m bench.intake [--requests N] [--images N] [--repeats N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import aiohttp

from app.demo_backends import DemoBackendState
from bench.core import KEY, free_port, quantile, start_backend, start_server
from bench.processes import MongoProcess, wait_until_answering
from bench.sampling import PY_SPY_MISSING, cpu_seconds, hottest, print_loop_profile, sampled

PEER_SCRIPT = Path(__file__).with_name("peer_server.py")
HEALTH_PROBE_S = 0.05


@dataclasses.dataclass
class Responsiveness:
    """How this server answered others while it took a figure's requests: `GET /health` asked
    from outside every HEALTH_PROBE_S (each wait, seconds), and its own event loop lag probe
    (devoid_event_loop_lag_seconds: how many probes fell in each bucket, by upper bound)."""

    health_waits: list[float] = dataclasses.field(default_factory=list)
    lag_buckets: dict[float, int] = dataclasses.field(default_factory=dict)

    def add_lags(self, before: dict[float, int], after: dict[float, int]) -> None:
        for bound, count in after.items():
            self.lag_buckets[bound] = self.lag_buckets.get(bound, 0) + count - before.get(bound, 0)

    def summary(self) -> str:
        waits = sorted(self.health_waits)
        health = "no answer"
        if waits:
            p50, p99 = (1e3 * quantile(waits, share) for share in (0.5, 0.99))
            health = (
                f"GET /health waited p50 {p50:.1f} / p99 {p99:.1f} / max {1e3 * waits[-1]:.1f} ms ({len(waits)} probes)"
            )
        return f"{health}; loop lag {lag_quantiles(self.lag_buckets)}"


def lag_quantiles(buckets: dict[float, int]) -> str:
    """p50 / p99 / max of the loop lag, each as the bucket bound it falls under."""
    cumulative = sorted(buckets.items())  # Prometheus buckets are cumulative counts
    total = cumulative[-1][1] if cumulative else 0
    if not total:
        return "not probed"

    def under(share: float) -> str:
        bound = next(bound for bound, count in cumulative if count >= share * total)
        return f"≤ {1e3 * bound:g} ms" if bound != float("inf") else "> 10 s"

    return f"p50 {under(0.5)}, p99 {under(0.99)}, max {under(1.0)} ({total} probes)"


async def loop_lag_buckets(base_url: str) -> dict[float, int]:
    """The server's devoid_event_loop_lag_seconds buckets now: upper bound -> probes at or under."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("devoid_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = int(float(line.rsplit(" ", 1)[1]))
    return buckets


def request_text(index: int, image: str | None = None) -> str:
    if image is not None:
        return json.dumps(
            {
                "message_type": "request",
                "executor": "automatic1111",
                "gen_type": "img2img",
                "settings": {},
                "service_info": {"user_id": index % 97},
                "payload": {"prompt": f"the same, at night {index}", "init_images": [image]},
            }
        )
    return json.dumps(
        {
            "message_type": "request",
            "executor": "automatic1111",
            "gen_type": "text2img",
            "settings": {"premium": 0},
            "service_info": {"user_id": index % 97, "chat_id": 5},
            "payload": {"prompt": f"a lighthouse at dusk, number {index}", "steps": 20, "width": 512, "height": 512},
        }
    )


def megabyte_image() -> str:
    """Base64 of 1 MB that begins like a PNG file (what the server checks), different per run."""
    start = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    return base64.b64encode(start + os.urandom(1024 * 1024 - len(start))).decode()


async def drive(
    base_url: str,
    pid: int,
    connections: int,
    total: int,
    image: str | None = None,
    health_waits: list[float] | None = None,
    *,
    one_at_a_time: bool = False,
) -> Measured:
    """Send `total` requests over `connections` sockets, each pipelining its share (or, with
    `one_at_a_time`, sending its next request only once the last one is `queued`, as a bot
    does); returns what was measured from first send to last `queued`. With `health_waits`, `GET /health` is asked every HEALTH_PROBE_S meanwhile, as
    a load balancer would, and each answer's wait (seconds) appended to it."""
    per_connection = total // connections
    texts = [request_text(index, image) for index in range(per_connection * connections)]
    headers = {"authorization": KEY, "service": "bench"}
    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(f"{base_url}/ws/bench", headers=headers, max_msg_size=0)
            for _ in range(connections)
        ]
        cpu_before, loop_before, started = cpu_seconds(pid), cpu_seconds(pid, thread=pid), time.perf_counter()

        async def answer_to(ws: aiohttp.ClientWebSocketResponse) -> None:
            while True:
                data = (await ws.receive()).data
                if '"queued"' in data:
                    return
                if '"error"' in data:
                    raise RuntimeError(data[:300])

        async def one(ws: aiohttp.ClientWebSocketResponse, share: list[str]) -> None:
            if one_at_a_time:
                for text in share:
                    await ws.send_str(text)
                    await answer_to(ws)
                return

            async def send() -> None:
                for text in share:
                    await ws.send_str(text)

            sender = asyncio.create_task(send())
            try:
                for _ in share:
                    await answer_to(ws)
            finally:
                await sender

        async def probe_health(waits: list[float]) -> None:
            while True:
                asked = time.perf_counter()
                async with session.get(f"{base_url}/health") as response:
                    await response.read()
                waits.append(time.perf_counter() - asked)
                await asyncio.sleep(HEALTH_PROBE_S)

        prober = asyncio.create_task(probe_health(health_waits)) if health_waits is not None else None
        try:
            await asyncio.gather(*(one(ws, texts[index::connections]) for index, ws in enumerate(sockets)))
        finally:
            if prober is not None:
                prober.cancel()
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
        loop_cpu = cpu_seconds(pid, thread=pid) - loop_before
        for ws in sockets:
            await ws.close()
    count = len(texts)
    return Measured(count / elapsed, cpu / count * 1e6, loop_cpu / count * 1e6)


class Measured(NamedTuple):
    accepted_per_s: float
    cpu_us: float  # the server's CPU per request, all threads
    loop_cpu_us: float  # the part of it in the thread that runs the event loop


class PeerProcess:
    def __init__(self, mode: str, folder: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), mode, str(self.port), str(folder / "peer.sqlite3")]
        )
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        code = self.process.poll
        await wait_until_answering(self.base_url, lambda: None if code() is None else f"peer server exited {code()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


async def run_ours(
    folder: Path,
    connections: int,
    total: int,
    profile_to: Path | None = None,
    image: str | None = None,
    *,
    gil_only: bool = False,
    mirrored: bool = False,
    responsiveness: Responsiveness | None = None,
    one_at_a_time: bool = False,
) -> Measured:
    """With `mirrored`, the server mirrors every record to a MongoDB (the wire-protocol test
    server of tests/mongo_server.py, in a process of its own): each request's row is committed
    with its record for the mirror, as in a deployment with MONGODB_URI set. With
    `responsiveness`, what others waited meanwhile is added to it. `one_at_a_time`: as in drive."""
    mongo = MongoProcess()
    env = {}
    if mirrored:
        await mongo.start()
        env = {"MONGODB_URI": mongo.uri, "MONGODB_DB": "bench"}
    try:
        return await _run_ours(
            folder, connections, total, profile_to, image, gil_only, env, responsiveness, one_at_a_time
        )
    finally:
        await mongo.stop()


async def _run_ours(
    folder: Path,
    connections: int,
    total: int,
    profile_to: Path | None,
    image: str | None,
    gil_only: bool,
    env: dict[str, str],
    responsiveness: Responsiveness | None,
    one_at_a_time: bool,
) -> Measured:
    state = DemoBackendState()
    state.gate.clear()  # the backend holds every job: only intake is measured
    runner, url = await start_backend(state)
    server = await start_server(folder, url, **env)
    pid = server.process.pid
    try:
        async with sampled(pid, profile_to, gil=gil_only):
            if responsiveness is None:
                return await drive(server.base_url, pid, connections, total, image, one_at_a_time=one_at_a_time)
            lags_before = await loop_lag_buckets(server.base_url)
            result = await drive(
                server.base_url,
                pid,
                connections,
                total,
                image,
                responsiveness.health_waits,
                one_at_a_time=one_at_a_time,
            )
            responsiveness.add_lags(lags_before, await loop_lag_buckets(server.base_url))
            return result
    finally:
        await server.stop()
        state.gate.set()
        await runner.cleanup()


async def run_peer(
    mode: str,
    folder: Path,
    connections: int,
    total: int,
    image: str | None = None,
    *,
    one_at_a_time: bool = False,
    profile_to: Path | None = None,
) -> Measured:
    folder.mkdir(parents=True, exist_ok=True)
    peer = PeerProcess(mode, folder)
    try:
        await peer.ready()
        async with sampled(peer.process.pid, profile_to):
            return await drive(peer.base_url, peer.process.pid, connections, total, image, one_at_a_time=one_at_a_time)
    finally:
        peer.stop()


def spread(values: list[float], unit: str) -> str:
    return f"{min(values):7.0f} / {statistics.median(values):7.0f} / {max(values):7.0f} {unit}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", default="small1,small50,bots50,images,mirrored", help="which, comma-separated")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    contestants = {"this server": None, "peer naive": "naive", "peer group-commit": "group"}
    # The small figures also have the floor of any aiohttp websocket server: each frame answered,
    # nothing parsed or stored (peer_server.py, echo).
    small_contestants = {**contestants, "peer echo (floor)": "echo"}
    # Beside the same server without the mirror: what mirroring every record costs at intake.
    mirror_contestants = {"this server": None, "with MongoDB mirror": "mirror"}
    # The image figure also has the least a server can do for it (peer_server.py, files).
    image_contestants = {**contestants, "peer files (floor)": "files"}
    image = megabyte_image()
    # name: (title, connections, requests, image, contestants, one at a time)
    figures = {
        "small1": (
            f"{args.requests} small durable accepts over 1 connection",
            1,
            args.requests,
            None,
            small_contestants,
            False,
        ),
        "small50": (
            f"{args.requests} small durable accepts over 50 connections",
            50,
            args.requests,
            None,
            small_contestants,
            False,
        ),
        # Bots as most send: the next request once the last is queued. Nothing is pipelined, so
        # what a server spends per message and per pass of its loop is not shared by a burst.
        "bots50": (
            f"{args.requests} small durable accepts from 50 bots, each sending its next once the last is queued",
            50,
            args.requests,
            None,
            small_contestants,
            True,
        ),
        "images": (
            f"{args.images} img2img requests of a 1 MB image each, over 4 connections",
            4,
            args.images,
            image,
            image_contestants,
            False,
        ),
        "mirrored": (
            f"{args.requests} small durable accepts over 1 connection, MongoDB mirror on",
            1,
            args.requests,
            None,
            mirror_contestants,
            False,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for number, figure in enumerate(args.figures.split(",")):
            title, connections, count, figure_image, in_figure, one_at_a_time = figures[figure]
            rates: dict[str, list[float]] = collections.defaultdict(list)
            cpus: dict[str, list[float]] = collections.defaultdict(list)
            loop_cpus: dict[str, list[float]] = collections.defaultdict(list)
            responsiveness = Responsiveness()
            for repeat in range(args.repeats):
                for name, mode in in_figure.items():
                    folder = root / f"{number}-{name.replace(' ', '-')}-{repeat}"
                    if mode is None or mode == "mirror":
                        measured = await run_ours(
                            folder,
                            connections,
                            count,
                            image=figure_image,
                            mirrored=mode == "mirror",
                            responsiveness=responsiveness if mode is None else None,
                            one_at_a_time=one_at_a_time,
                        )
                    else:
                        measured = await run_peer(
                            mode, folder, connections, count, figure_image, one_at_a_time=one_at_a_time
                        )
                    rates[name].append(measured.accepted_per_s)
                    cpus[name].append(measured.cpu_us)
                    loop_cpus[name].append(measured.loop_cpu_us)
                    shutil.rmtree(folder, ignore_errors=True)
            print(f"\n{title}, {args.repeats} repeats (min / median / max)")
            for name in in_figure:
                print(
                    f"  {name:18} {spread(rates[name], 'req/s')}   server CPU {spread(cpus[name], 'µs/req')}"
                    f" (event loop's thread {spread(loop_cpus[name], 'µs')})"
                )
            print(f"  this server meanwhile, all repeats: {responsiveness.summary()}")
        if args.profile:
            if shutil.which("py-spy") is None:
                print(f"\n--profile: {PY_SPY_MISSING}")
                return
            profile = root / "profile.txt"
            await run_ours(root / "profiled", 50, args.requests, profile_to=profile)
            print_loop_profile(profile, "this server, 50 connections")
            # The same requests through the group-commit peer: what the least durable intake
            # spends, and in which layer, beside this server's.
            peer_profile = root / "peer-profile.txt"
            await run_peer("group", root / "profiled-peer", 50, args.requests, profile_to=peer_profile)
            print_loop_profile(peer_profile, "peer group-commit, 50 connections")
            # 1 MB requests are parsed, checked and written in worker threads, all bound by the
            # GIL: what holds it, in any thread.
            images_profile = root / "images-profile.txt"
            await run_ours(root / "profiled-images", 4, args.images, images_profile, image, gil_only=True)
            print("\nthis server, 1 MB img2img requests, self time by function while holding the GIL (py-spy --gil):")
            for line in hottest(images_profile):
                print("  " + line)


if __name__ == "__main__":
    asyncio.run(main())
