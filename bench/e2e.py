"""End-to-end job throughput: no-op jobs per second through the whole balancer (accept ->
commit -> dispatch -> instant backend -> image stored -> `ok` delivered), with 8 instant
AUTOMATIC1111 test backends, beside huey running no-op tasks (bench/huey_peer.py) in the
same run. Repeats interleaved; min / median / max.

Usage: .venv/bin/python -m bench.e2e [--jobs N] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from bench.core import KEY, balancer

BACKENDS = 8


async def balancer_rate(folder: Path, jobs: int) -> float:
    runners, specs = [], []
    for number in range(BACKENDS):
        runner, url = await serve_on_loopback(automatic1111_app(DemoBackendState()))
        runners.append(runner)
        specs.append({"name": f"gpu{number}", "exec_type": "automatic1111", "endpoint": url, "timeout": 60})
    server = balancer(folder, specs)
    await server.start()
    texts = [
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
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"{server.base_url}/ws/bench", max_msg_size=0, headers={"authorization": KEY, "service": "bench"}
            ) as ws:
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
                return jobs / (time.perf_counter() - started)
    finally:
        await server.stop()
        for runner in runners:
            await runner.cleanup()


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            ours.append(await balancer_rate(Path(tmp) / f"ours{repeat}", args.jobs))
            rate = huey_rate(Path(tmp), args.jobs)
            if rate is not None:
                peer.append(rate)
    print(f"no-op jobs per second, {args.jobs} jobs, {args.repeats} repeats (min / median / max)")
    print(
        f"  this server, {BACKENDS} instant backends: {min(ours):6.0f} / {statistics.median(ours):6.0f} / {max(ours):6.0f}"
    )
    if peer:
        print(
            f"  huey, 1 worker, no-op task:       {min(peer):6.0f} / {statistics.median(peer):6.0f} / {max(peer):6.0f}"
        )
    else:
        print("  huey: not installed (pip install -r bench/requirements.txt)")


if __name__ == "__main__":
    asyncio.run(main())
