"""The dispatch gap's floor peer: the least a durable balancer does per job, written by hand,
in a process of its own, so the gap it leaves on a backend can be set beside the server's.

Per job, exactly what the server owes its client and nothing else:
- the claim (`generating`) committed, meanwhile the backend is called at once;
- the backend's answer read, and the backend given its next job straight away;
- the image stored durably off the event loop, in one worker-thread hop: PNG read, JPEG
  written (the format every result is stored as), fsynced, renamed into place, its folder
  fsynced;
- the result committed (WAL, synchronous=FULL; one writer task commits whatever is waiting
  together, so a job's result and the next job's claim share a commit);
- `generating` and `ok` sent to the client over its websocket.

No estimates, no retries, no progress polling, no mirrors, no validation: what remains is
SQLite, the filesystem, Pillow, aiohttp and asyncio, the same ones the server uses.

The bench connects to /ws, sends {"jobs": N}; the floor commits N queued rows, answers
{"ready": N}, and calls its backends (which hold every call until the bench opens them),
one job at a time per backend, until all N are answered.

Usage (by bench/core.py): python -m bench.dispatch_floor PORT FOLDER BACKEND_URL...
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import os
import sqlite3
import sys
import threading
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from PIL import Image

JPEG_QUALITY = 92  # the server's (app/images.py)

_ONE_WRITER = threading.Lock()


def open_database(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, backend TEXT, image TEXT)")
    return db


def commit(db: sqlite3.Connection, updates: list[tuple[str, str, str, int]]) -> None:
    with _ONE_WRITER:
        db.execute("BEGIN")
        db.executemany("UPDATE jobs SET status = ?, backend = coalesce(?, backend), image = ? WHERE id = ?", updates)
        db.execute("COMMIT")


def store_image(folder: Path, job_id: int, answer: bytes) -> str:
    """The backend's answer to a JPEG file, durably; returns the file's name."""
    png = base64.b64decode(orjson.loads(answer)["images"][0])
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG", quality=JPEG_QUALITY)
    name = f"{job_id:024x}.jpg"
    temporary = folder / f"{name}.tmp"
    with open(temporary, "wb") as file:
        file.write(jpeg.getbuffer())
        file.flush()
        os.fsync(file.fileno())
    os.rename(temporary, folder / name)
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return name


class GroupWriter:
    """One task; every update waiting when it wakes goes into one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.waiting: list[tuple[tuple[str, str, str, int], asyncio.Future[None]]] = []
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    def write(self, update: tuple[str, str | None, str | None, int]) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((update, done))  # type: ignore[arg-type]
        self.wake.set()
        return done

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            await asyncio.to_thread(commit, self.db, [update for update, _ in batch])
            for _, done in batch:
                done.set_result(None)


async def serve(folder: Path, backend_urls: list[str], request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    jobs = orjson.loads((await ws.receive()).data)["jobs"]
    db = open_database(folder / "floor.sqlite3")
    db.executemany("INSERT INTO jobs (id, status) VALUES (?, 'queued')", [(n,) for n in range(jobs)])
    line = collections.deque(range(jobs))
    writer = GroupWriter(db)
    await ws.send_bytes(orjson.dumps({"ready": jobs}))
    finishing: set[asyncio.Task[None]] = set()

    async def tell_generating(job_id: int, claimed: asyncio.Future[None]) -> None:
        await claimed
        await ws.send_bytes(orjson.dumps({"gen_status": "generating", "object_id": job_id}))

    async def finish(job_id: int, claimed: asyncio.Future[None], answer: bytes) -> None:
        name = await asyncio.to_thread(store_image, folder, job_id, answer)
        await claimed
        await writer.write(("ok", None, name, job_id))
        await ws.send_bytes(orjson.dumps({"gen_status": "ok", "object_id": job_id, "image": name}))

    def in_background(coroutine: object) -> None:
        task = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        finishing.add(task)
        task.add_done_callback(finishing.discard)

    async def dispatcher(session: aiohttp.ClientSession, url: str) -> None:
        while line:
            job_id = line.popleft()
            claimed = writer.write(("generating", url, None, job_id))
            in_background(tell_generating(job_id, claimed))
            async with session.post(
                f"{url}/sdapi/v1/txt2img", data=orjson.dumps({"prompt": f"r{job_id}", "steps": 20})
            ) as response:
                answer = await response.read()
            in_background(finish(job_id, claimed, answer))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(dispatcher(session, url) for url in backend_urls))
        while finishing:
            await asyncio.gather(*finishing)
    await ws.close()
    return ws


def main() -> None:
    port, folder, backend_urls = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    folder.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    app.router.add_get("/ws", lambda request: serve(folder, backend_urls, request))
    app.router.add_get("/", lambda request: web.Response(text="floor"))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
