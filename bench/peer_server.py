"""The peers the intake figures are compared with: the smallest durable websocket intake one
would write by hand, in two variants.

- naive: each request is inserted and committed (WAL, synchronous=FULL) on its own before
  its `queued` answer;
- group: one writer task commits whatever requests are waiting in one transaction (group
  commit), then answers each.

Both parse the JSON, check the envelope's keys, store the message text and answer
`{"gen_status": "queued", "object_id": ...}`. No validation of the payload, no scheduler, no
mirrors: a floor for what durable intake costs in Python on this machine.

Usage: python bench/peer_server.py {naive,group} PORT DATABASE
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import uuid

from aiohttp import WSMsgType, web

REQUIRED_KEYS = ("message_type", "executor", "gen_type", "service_info", "payload")
MAX_BATCH = 128


def open_database(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE IF NOT EXISTS requests (object_id TEXT PRIMARY KEY, message TEXT)")
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


def make_app(mode: str, path: str) -> web.Application:
    db = open_database(path)
    app = web.Application()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        writer = request.app.get("writer")
        if mode == "group" and writer is None:
            writer = request.app["writer"] = GroupWriter(db)

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

        tasks = set()
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if mode == "group":  # concurrent accepts, so batches can form
                    task = asyncio.create_task(accept(message.data))
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
