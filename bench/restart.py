"""Restart time and memory with a large backlog: how long `python -m app` takes to be ready
(answering HTTP, dispatching) and its peak RSS, with N queued 1 MB img2img requests and with
M queued small requests in its database; and when it has read the whole queue back (it
serves meanwhile: app/engine/backlog.py).

Beside each: the baseline in the same run, the time and peak memory it takes just to read and
parse every queued row whole (what a queue rebuild that loads payloads costs).

Usage: .venv/bin/python -m bench.restart [--images 2000] [--small 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from app.domain.costs import payload_cost_units
from app.domain.ids import new_object_id
from app.domain.jobs import LARGE_PAYLOAD_CHARS, ExecutorType, GenType
from app.storage.payload_files import PayloadFiles, outline
from app.storage.store import Store
from bench.core import demo_server, memory_mb

PNG_HEAD = b"\x89PNG\r\n\x1a\n"


async def create_schema(path: Path) -> None:
    store = await Store.open(path)
    await store.close()


def fill(path: Path, count: int, image_bytes: int) -> None:
    """`count` queued requests, as the server stores them (an image of `image_bytes` each, or a
    small text2img payload when 0)."""
    image = base64.b64encode(PNG_HEAD + os.urandom(max(0, image_bytes - len(PNG_HEAD)))).decode()
    now = time.time()
    files = PayloadFiles.beside(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        rows = []
        for n in range(count):
            if image_bytes:
                gen_type, payload = GenType.IMG2IMG, {"prompt": f"p{n}", "init_images": [image]}
            else:
                gen_type, payload = GenType.TEXT2IMG, {"prompt": f"p{n}", "steps": 20}
            text = json.dumps(payload)
            object_id = new_object_id()
            in_file = len(text) >= LARGE_PAYLOAD_CHARS  # where Store.add keeps it
            if in_file:
                files.path(object_id).write_text(text)
            rows.append(
                (
                    object_id,
                    "test",
                    "automatic1111",
                    gen_type.value,
                    json.dumps({}),
                    json.dumps({"user_id": n}),
                    json.dumps(outline(payload)) if in_file else text,
                    now,
                    1,
                    payload_cost_units(ExecutorType.AUTOMATIC1111, gen_type, payload),
                    len(text),
                    int(in_file),
                )
            )
            if len(rows) == 500:
                _insert(db, rows)
                rows = []
        _insert(db, rows)


def _insert(db: sqlite3.Connection, rows: list[tuple]) -> None:
    db.executemany(
        "INSERT INTO requests (object_id, service, executor, gen_type, settings, service_info,"
        " payload, status, created_at, revision, cost_units, payload_chars, payload_file)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()


async def restart(path: Path, workdir: Path) -> tuple[float, float, float, float]:
    """Seconds from spawn until the server answers HTTP and its peak RSS (MB) by then; then
    the same once it has read the whole stored queue back (its /health says so)."""
    server = demo_server(workdir, path, DEMO_DELAY_S="5", MAX_QUEUE_WAIT_S="86400")
    started = time.monotonic()
    await server.start()
    ready_s = time.monotonic() - started
    peak_mb = memory_mb(server.process.pid, "VmHWM")
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(server.base_url + "/health") as response:
                if "reading back" not in (await response.json())["reason"]:
                    break
            await asyncio.sleep(0.02)
    read_back_s = time.monotonic() - started
    read_back_mb = memory_mb(server.process.pid, "VmHWM")
    server.kill()
    await server.wait()
    return ready_s, peak_mb, read_back_s, read_back_mb


def read_everything(path: Path) -> tuple[float, float]:
    """Baseline: read and parse every queued row whole (its payload file too), in a child
    process (its own peak RSS)."""
    code = (
        "import json, sqlite3, sys, time\n"
        "t = time.monotonic(); db = sqlite3.connect(sys.argv[1]); files = sys.argv[1] + '.payloads/'\n"
        "sql = \"SELECT * FROM requests WHERE status = 'queued'\"\n"
        "rows = [{k: v for k, v in zip([c[0] for c in cur.description], r)} for cur in [db.execute(sql)] for r in cur]\n"
        "for row in rows: row['payload'] = json.loads(open(files + row['object_id'] + '.json').read()"
        " if row['payload_file'] else row['payload'])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(time.monotonic() - t, int(hwm) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    seconds, peak = out.stdout.split()
    return float(seconds), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="queued 1 MB img2img requests")
    parser.add_argument("--small", type=int, default=100_000, help="queued small requests")
    args = parser.parse_args()
    for label, count, size in (
        ("empty queue (process start-up alone)", 0, 0),
        (f"{args.images} x 1 MB img2img", args.images, 1_000_000),
        (f"{args.small} small", args.small, 0),
    ):
        with tempfile.TemporaryDirectory() as folder:
            workdir = Path(folder)
            path = workdir / "backlog.sqlite3"
            asyncio.run(create_schema(path))
            fill(path, count, size)
            # The fill's writes reach the disk before the clock starts: 10 GB of payload files
            # still being written back made the next case's start 3x slower.
            os.sync()
            ready_s, peak_mb, read_back_s, read_back_mb = asyncio.run(restart(path, workdir))
            base_s, base_mb = read_everything(path)
            print(
                f"{label}: ready in {ready_s:.2f} s, peak RSS {peak_mb:.0f} MB; queue all read back in "
                f"{read_back_s:.2f} s, peak RSS {read_back_mb:.0f} MB | baseline, reading every queued row whole: "
                f"{base_s:.2f} s, peak RSS {base_mb:.0f} MB"
            )


if __name__ == "__main__":
    main()
