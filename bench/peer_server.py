"""The peers the intake figures are compared with: the smallest durable websocket intake one
would write by hand, in three variants.

- naive: each request is inserted and committed (WAL, synchronous=FULL) on its own before
  its `queued` answer;
- group: one writer task commits whatever requests are waiting in one transaction (group
  commit), then answers each;
- files: the least a server can do for requests carrying images, as issue 11 prescribes: the
  frame's bytes parsed once (orjson), each image checked as strict base64 by one C pass, the
  frame written as it came to a file of its own (write, fsync, directory fsync; one writer at
  a time), in a worker thread; then its row (object_id, file) group-committed.

- echo: no durability at all, the floor under the other two: each frame is answered as it
  is read, with an id and nothing parsed, checked or stored. What is left is aiohttp's and
  asyncio's own work per websocket message received and sent.

naive and group parse the JSON, check the envelope's keys and store the message text. All
answer `{"gen_status": "queued", "object_id": ...}`. No validation of the payload beyond the
images, no scheduler, no mirrors: a floor for what durable intake costs in Python on this
machine.

Usage: python bench/peer_server.py {naive,group,files,echo} PORT DATABASE
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import threading
import uuid
from pathlib import Path

import orjson
from aiohttp import WSMsgType, web

REQUIRED_KEYS = ("message_type", "executor", "gen_type", "service_info", "payload")
# Rows per transaction: the server's own default (STORE_BATCH_ROWS), so the two batch alike.
# At 128 rows this peer took 7,839-9,158 requests/s over 50 connections, at 512 9,573-10,057
# (3 interleaved pairs).
MAX_BATCH = 512
BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


REQUESTS_TABLE = "CREATE TABLE IF NOT EXISTS requests (object_id TEXT PRIMARY KEY, message TEXT)"


def open_database(path: str | Path, table: str = REQUESTS_TABLE) -> sqlite3.Connection:
    """A connection whose commits are durable (WAL, synchronous=FULL), transactions begun by
    hand, with `table` created. bench/dispatch_floor.py opens its own this way too."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(table)
    return db


_ONE_WRITER = threading.Lock()  # one connection, used from worker threads in turn


def insert_committed(db: sqlite3.Connection, rows: list[tuple[str, str]]) -> None:
    with _ONE_WRITER:
        db.execute("BEGIN")
        db.executemany("INSERT INTO requests VALUES (?, ?)", rows)
        db.execute("COMMIT")


class GroupWriter:
    """One task; every request waiting when it wakes goes into one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.waiting: asyncio.Queue[tuple[tuple[str, str], asyncio.Future[None]]] = asyncio.Queue()
        self.task = asyncio.create_task(self.run())

    async def write(self, row: tuple[str, str]) -> None:
        done = asyncio.get_running_loop().create_future()
        self.waiting.put_nowait((row, done))
        await done

    async def run(self) -> None:
        while True:
            batch = [await self.waiting.get()]
            while len(batch) < MAX_BATCH and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            await asyncio.to_thread(insert_committed, self.db, [row for row, _ in batch])
            for _, done in batch:
                done.set_result(None)


def strict_base64(image: str) -> bool:
    rest = image.encode("ascii", "replace").translate(None, BASE64_ALPHABET)
    return len(image) % 4 == 0 and rest in (b"", b"=", b"==") and image.endswith(rest.decode())


def file_checked(folder: Path, object_id: str, frame: bytes) -> bool:
    """Parse, check the images, and write the frame durably to its file; False if refused."""
    message = orjson.loads(frame)
    if any(key not in message for key in REQUIRED_KEYS):
        return False
    if not all(strict_base64(image) for image in message["payload"].get("init_images", [])):
        return False
    descriptor = os.open(folder / object_id, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(frame)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def make_app(mode: str, path: str) -> web.Application:
    db = open_database(path)
    folder = Path(path + ".files")
    folder.mkdir(exist_ok=True)
    one_file_writer = asyncio.Lock()
    app = web.Application()
    # The group writer, made by the first connection (it needs the running loop).
    shared: dict[str, GroupWriter] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(decode_text=mode != "files")
        await ws.prepare(request)
        writer = shared.get("writer")
        if mode != "naive" and writer is None:
            writer = shared["writer"] = GroupWriter(db)

        async def accept(text: str) -> None:
            message = json.loads(text)
            if any(key not in message for key in REQUIRED_KEYS):
                await ws.send_str(json.dumps({"gen_status": "error", "reason": "missing keys"}))
                return
            object_id = uuid.uuid4().hex
            if mode == "group":
                await writer.write((object_id, text))
            else:
                await asyncio.to_thread(insert_committed, db, [(object_id, text)])
            await ws.send_str(json.dumps({"gen_status": "queued", "object_id": object_id}))

        async def accept_with_file(frame: bytes) -> None:
            object_id = uuid.uuid4().hex
            async with one_file_writer:
                stored = await asyncio.to_thread(file_checked, folder, object_id, frame)
            if not stored:
                await ws.send_str(json.dumps({"gen_status": "error", "reason": "refused"}))
                return
            await writer.write((object_id, object_id))
            await ws.send_str(json.dumps({"gen_status": "queued", "object_id": object_id}))

        tasks = set()
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if mode == "echo":
                    await ws.send_str(f'{{"gen_status":"queued","object_id":"{uuid.uuid4().hex}"}}')
                elif mode != "naive":  # concurrent accepts, so batches can form
                    accepting = accept_with_file if mode == "files" else accept
                    task = asyncio.create_task(accepting(message.data))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    await accept(message.data)
        return ws

    app.router.add_get("/ws/{service}", handler)
    app.router.add_get("/", lambda request: web.Response(text="peer"))
    return app


if __name__ == "__main__":
    mode, port, database = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    web.run_app(make_app(mode, database), host="127.0.0.1", port=port, print=None, access_log=None)
