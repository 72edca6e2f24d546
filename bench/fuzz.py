"""The long fuzz run: seeded fuzzed frames (tests/fuzz_frames.py) over several websockets to
the real server process, each frame waiting for its one answer.

Prints frames sent, answers by kind, frames left unanswered, whether the server process
survived, ERROR lines in its log, and its RSS before and after (with the RSS of a server that
was sent only valid requests in the same number, as the baseline).

Usage: .venv/bin/python -m bench.fuzz [--frames 40000] [--connections 4] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.bots import Bot
from bench.core import demo_server, memory_mb
from bench.fuzz_frames import BASE_REQUESTS, answer_to_frame, fuzz_frames

HEADERS = {"authorization": "demo-key", "service": "test"}


async def run(frames: list[str], connections: int, workdir: Path) -> dict:
    server = demo_server(workdir, workdir / "fuzz.sqlite3", DEMO_DELAY_S="0")
    await server.start()
    pid = server.process.pid
    rss_before = memory_mb(pid)
    kinds: collections.Counter[str] = collections.Counter()
    unanswered = 0
    started = time.monotonic()

    async def connection(share: list[str]) -> None:
        nonlocal unanswered
        async with aiohttp.ClientSession() as session:
            bot = Bot(await session.ws_connect(f"{server.base_url}/ws/test", headers=HEADERS, max_msg_size=0))
            queued: set[str] = set()
            for frame in share:
                await bot.send(frame)
                try:
                    answer = await answer_to_frame(bot, queued)
                except (TimeoutError, ConnectionError):
                    unanswered += 1
                    continue
                kinds[answer.get("info_type") or answer["gen_status"]] += 1
                bot.received.clear()  # keep the client's memory flat over a long run

    await asyncio.gather(*[connection(frames[n::connections]) for n in range(connections)])
    elapsed = time.monotonic() - started
    alive = server.process.returncode is None
    rss_after = memory_mb(pid) if alive else float("nan")
    await server.stop()
    errors = [line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line]
    return {
        "kinds": kinds,
        "unanswered": unanswered,
        "alive": alive,
        "errors": errors,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    import json

    fuzzed = list(fuzz_frames(args.seed, args.frames))
    valid = [json.dumps(BASE_REQUESTS[n % 4]) for n in range(args.frames)]
    for label, frames in (("fuzzed", fuzzed), ("valid only (baseline)", valid)):
        with tempfile.TemporaryDirectory() as folder:
            outcome = asyncio.run(run(frames, args.connections, Path(folder)))
        print(
            f"{label}: {len(frames)} frames in {outcome['seconds']:.0f} s, "
            f"answered {sum(outcome['kinds'].values())}, unanswered {outcome['unanswered']}, "
            f"server alive: {outcome['alive']}, ERROR/traceback lines: {len(outcome['errors'])}, "
            f"RSS {outcome['rss_before']:.0f} -> {outcome['rss_after']:.0f} MB"
        )
        print(f"  answers: {dict(outcome['kinds'].most_common())}")
        for line in outcome["errors"][:5]:
            print(f"  {line}")


if __name__ == "__main__":
    main()
