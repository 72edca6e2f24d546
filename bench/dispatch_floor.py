"""The floor peer of the dispatch figures (bench/core.py's gap, bench/e2e.py's jobs/s): the
least a durable balancer does per request, written by hand, in a process of its own, so what
it leaves on the backends can be set beside the server's.

Per request, exactly what the server owes its client and nothing else:
- intake: the frame parsed (orjson), its row committed (WAL, synchronous=FULL) before its
  `queued` is sent;
- the claim (`generating`) committed, meanwhile the backend is called at once, one job at a
  time per backend, in arrival order;
- the backend's answer read, and the backend given its next job straight away;
- the image stored durably off the event loop, in one worker-thread hop: the answer parsed,
  the PNG read and written as JPEG (the format every result is stored as), fsynced, renamed
  into place, its folder fsynced;
- the result committed, then `ok` sent.
One writer task commits whatever is waiting together (new rows, claims, results: a group
commit, as the server's store does). No validation beyond the envelope's keys, no estimates,
no retries, no progress polling, no mirrors, no logging: what remains is SQLite, the
filesystem, Pillow, aiohttp and asyncio, the same ones the server uses.

The bench connects to /ws and sends requests as it would to the server; every message is
answered on that connection.

Usage (by the benches): python -m bench.dispatch_floor PORT FOLDER BACKEND_URL...
"""

from __future__ import annotations

import asyncio
import base64
import collections
import sqlite3
import sys
from collections.abc import Coroutine
from pathlib import Path

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from app.images import to_jpeg
from app.storage.results import image_file_name, write_atomically
from bench.peer_server import REQUIRED_KEYS, open_database

Statement = tuple[str, tuple[object, ...]]
JOBS_TABLE = "CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, message TEXT, backend TEXT, image TEXT)"
INSERT = "INSERT INTO jobs (id, status, message) VALUES (?, 'queued', ?)"
UPDATE = "UPDATE jobs SET status = ?, backend = coalesce(?, backend), image = ? WHERE id = ?"


def commit(db: sqlite3.Connection, statements: list[Statement]) -> None:
    """One transaction. Only the writer task calls it, one call at a time."""
    db.execute("BEGIN")
    for sql, parameters in statements:
        db.execute(sql, parameters)
    db.execute("COMMIT")


def store_image(folder: Path, job_id: int, answer: bytes) -> str:
    """The backend's answer to a JPEG file, durably; returns the file's name. The conversion
    and the write are the server's own (app/images.py, app/storage/results.py): what is
    measured here is everything around them."""
    png = base64.b64decode(orjson.loads(answer)["images"][0])
    name = image_file_name(f"{job_id:024x}")
    write_atomically(folder / name, to_jpeg(png))
    return name


class GroupWriter:
    """One task; every statement waiting when it wakes goes into one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.waiting: list[tuple[Statement, asyncio.Future[None]]] = []
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    def write(self, sql: str, *parameters: object) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append(((sql, parameters), done))
        self.wake.set()
        return done

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            await asyncio.to_thread(commit, self.db, [statement for statement, _ in batch])
            for _, done in batch:
                done.set_result(None)


class Floor:
    """The requests of one client connection, from its frames to their `ok`s."""

    def __init__(self, folder: Path, backend_urls: list[str], ws: web.WebSocketResponse) -> None:
        self.folder = folder
        self.ws = ws
        self.writer = GroupWriter(open_database(folder / f"floor-{id(ws)}.sqlite3", JOBS_TABLE))
        self.line: collections.deque[tuple[int, bytes]] = collections.deque()
        self.waiting_work = asyncio.Condition()
        self.next_id = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.session = aiohttp.ClientSession()
        self.dispatchers = [asyncio.create_task(self.dispatcher(url)) for url in backend_urls]

    def in_background(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, message: dict[str, object]) -> None:
        if not self.ws.closed:  # the bench hung up: nobody is left to tell
            await self.ws.send_str(orjson.dumps(message).decode())

    async def accept(self, frame: str) -> None:
        message = orjson.loads(frame)
        if any(key not in message for key in REQUIRED_KEYS):
            await self.send({"gen_status": "error", "reason": "missing keys"})
            return
        job_id, self.next_id = self.next_id, self.next_id + 1
        await self.writer.write(INSERT, job_id, frame)
        await self.send({"gen_status": "queued", "object_id": job_id})
        self.line.append((job_id, orjson.dumps(message["payload"])))
        async with self.waiting_work:
            self.waiting_work.notify()

    async def dispatcher(self, url: str) -> None:
        while True:
            async with self.waiting_work:
                await self.waiting_work.wait_for(lambda: bool(self.line))
            job_id, payload = self.line.popleft()
            claimed = self.writer.write(UPDATE, "generating", url, None, job_id)
            self.in_background(self.tell_generating(job_id, claimed))
            async with self.session.post(f"{url}/sdapi/v1/txt2img", data=payload) as response:
                answer = await response.read()
            self.in_background(self.finish(job_id, claimed, answer))

    async def tell_generating(self, job_id: int, claimed: asyncio.Future[None]) -> None:
        await claimed
        await self.send({"gen_status": "generating", "object_id": job_id})

    async def finish(self, job_id: int, claimed: asyncio.Future[None], answer: bytes) -> None:
        name = await asyncio.to_thread(store_image, self.folder, job_id, answer)
        await claimed
        await self.writer.write(UPDATE, "ok", None, name, job_id)
        await self.send({"gen_status": "ok", "object_id": job_id, "image": name})

    async def close(self) -> None:
        for task in self.dispatchers:
            task.cancel()
        self.writer.task.cancel()
        await self.session.close()


async def serve(folder: Path, backend_urls: list[str], request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    floor = Floor(folder, backend_urls, ws)
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                floor.in_background(floor.accept(message.data))
    finally:
        await floor.close()
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
