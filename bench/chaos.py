"""Kill -9 cycles under load: counts lost, silent and duplicated final answers.

The real server runs as a subprocess (`python -m app`, TEST_MODE=1 demo backends). Bots (each
a service of its own) keep requests in flight over websockets; each request carries a `service_info.request_id`, and
half the bots also ask for acknowledgements (`settings.require_ack`) and ack every final.
Every cycle the server is killed with SIGKILL at a random moment and started again on the
same database; bots reconnect and resend what had not been acknowledged with `queued` (same
request_id). After the last cycle the server runs until every request has its final.

Printed, per kind of bot:
- acknowledged: requests answered `queued`
- lost: acknowledged, but not in the database at the end
- silent: acknowledged, in the database, but no final ever reached the bot
- duplicate finals: finals received more than once for one object_id (at-least-once across
  crashes allows these when the kill falls between sending a final and recording it)
- generated twice: request_ids that ended up as two different requests (idempotency broken)

With --image-share, that share of the requests are img2img requests carrying a ~100 KB image
(kept in payload files beside the database, written before the row that names them); the
report then also counts image requests whose file is missing and files no request names.

Usage: .venv/bin/python -m bench.chaos [--cycles 100] [--bots 4] [--image-share 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app.storage.payload_files import PayloadFiles
from bench.core import demo_server
from bench.images import noisy_png_base64
from bench.processes import ServerProcess

IN_FLIGHT_PER_BOT = 10
DRAIN_TIMEOUT_S = 60.0


@dataclass
class ChaosBot:
    name: str
    acks: bool
    image: str | None = None  # sent with a share of the requests (img2img)
    image_share: float = 0.0
    counter: int = 0
    unacknowledged: dict[str, dict] = field(default_factory=dict)  # request_id -> message, no `queued` yet
    object_ids: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    waiting_final: set[str] = field(default_factory=set)
    finals: collections.Counter[str] = field(default_factory=collections.Counter)

    def new_request(self) -> dict:
        self.counter += 1
        request_id = f"{self.name}-{self.counter}"
        message = {
            "message_type": "request",
            "executor": random.choice(["kandinsky", "automatic1111"]),
            "gen_type": "text2img",
            "settings": {"premium": random.random() < 0.25, "require_ack": int(self.acks)},
            "service_info": {"user_id": random.randint(1, 50), "request_id": request_id},
            "payload": {"prompt": f"chaos {request_id}", "steps": 20},
        }
        if self.image is not None and random.random() < self.image_share:
            message |= {"executor": "automatic1111", "gen_type": "img2img"}
            message["payload"] = {"prompt": f"chaos {request_id}", "steps": 20, "init_images": [self.image]}
        self.unacknowledged[request_id] = message
        return message

    def in_flight(self) -> int:
        return len(self.unacknowledged) + len(self.waiting_final)

    async def run(self, session: aiohttp.ClientSession, url: str, keep_sending: bool) -> None:
        """One connection's life: resend what was never acknowledged, keep sending new
        requests (if `keep_sending`), take answers; returns when the connection drops."""
        try:
            ws = await session.ws_connect(
                f"{url}/ws/{self.name}",
                max_msg_size=0,
                headers={"authorization": f"key-{self.name}", "service": self.name},
            )
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
            return
        async with ws:
            for message in list(self.unacknowledged.values()):
                await ws.send_str(json.dumps(message))
            sender = asyncio.create_task(self._send_new(ws)) if keep_sending else None
            try:
                async for frame in ws:
                    if frame.type is not aiohttp.WSMsgType.TEXT:
                        break
                    await self._on_message(ws, json.loads(frame.data))
            except (aiohttp.ClientError, ConnectionError):
                pass
            finally:
                if sender is not None:
                    sender.cancel()

    async def _send_new(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            while True:
                if self.in_flight() < IN_FLIGHT_PER_BOT:
                    await ws.send_str(json.dumps(self.new_request()))
                else:
                    await asyncio.sleep(0.005)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            pass

    async def _on_message(self, ws: aiohttp.ClientWebSocketResponse, message: dict) -> None:
        if message.get("message_type") != "response":
            return
        request_id = message["service_info"].get("request_id")
        object_id = message["object_id"]
        if message["gen_status"] in ("queued", "generating") and request_id in self.unacknowledged:
            del self.unacknowledged[request_id]
            self.object_ids[request_id].add(object_id)
            self.waiting_final.add(object_id)
        elif message["gen_status"] in ("ok", "error"):
            self.unacknowledged.pop(request_id, None)
            self.object_ids[request_id].add(object_id)
            self.finals[object_id] += 1
            self.waiting_final.discard(object_id)
            if self.acks:
                await ws.send_str(json.dumps({"message_type": "info", "action": "ack", "object_id": object_id}))


async def run_cycles(cycles: int, bot_count: int, workdir: Path, image_share: float = 0.0) -> dict[str, ChaosBot]:
    # Each bot is a service of its own, so each final has exactly one bot to reach.
    services = " ".join(f"bot{n}:key-bot{n}" for n in range(bot_count))
    env = demo_server(
        workdir, workdir / "chaos.sqlite3", SERVICES=services, DEMO_DELAY_S="0.02", SHUTDOWN_GRACE_S="1"
    ).env
    image = noisy_png_base64(side=190) if image_share else None  # ~140 KB of base64
    bots = {
        f"bot{n}": ChaosBot(f"bot{n}", acks=n % 2 == 1, image=image, image_share=image_share) for n in range(bot_count)
    }
    async with aiohttp.ClientSession() as session:
        for cycle in range(cycles + 1):
            last = cycle == cycles
            server = ServerProcess(env, workdir / "server.log", cwd=workdir)
            await server.start()
            connections = [
                asyncio.create_task(bot_loop(bot, session, server.base_url, not last)) for bot in bots.values()
            ]
            if last:
                await drain(bots)
                await server.stop()
            else:
                await asyncio.sleep(random.uniform(0.3, 1.5))
                server.kill()
                await server.wait()
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            if cycle % 10 == 0:
                print(
                    f"cycle {cycle}/{cycles}: {sum(len(b.object_ids) for b in bots.values())} requests", file=sys.stderr
                )
    return bots


async def bot_loop(bot: ChaosBot, session: aiohttp.ClientSession, url: str, keep_sending: bool) -> None:
    while True:
        await bot.run(session, url, keep_sending)


async def drain(bots: dict[str, ChaosBot]) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(not bot.waiting_final and not bot.unacknowledged for bot in bots.values()):
            await asyncio.sleep(1.0)  # let late duplicates arrive, if any would
            return
        await asyncio.sleep(0.1)


def report(bots: dict[str, ChaosBot], database: Path, cycles: int) -> None:
    with sqlite3.connect(database) as db:
        stored = {row[0]: row[1] for row in db.execute("SELECT object_id, status FROM requests")}
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    print(f"{cycles} kill -9 cycles; integrity_check: {integrity}")
    print(
        f"{'bots':<22} {'acknowledged':>12} {'lost':>5} {'silent':>7} {'dup finals':>10} "
        f"{'gen. twice':>10} {'unacked at end':>14}"
    )
    for acks in (False, True):
        group = [bot for bot in bots.values() if bot.acks == acks]
        acknowledged = {oid for bot in group for oids in bot.object_ids.values() for oid in oids}
        lost = [oid for oid in acknowledged if oid not in stored]
        silent = [oid for oid in acknowledged if oid in stored and not any(bot.finals[oid] for bot in group)]
        duplicates = sum(count - 1 for bot in group for count in bot.finals.values() if count > 1)
        twice = sum(1 for bot in group for oids in bot.object_ids.values() if len(oids) > 1)
        pending = sum(len(bot.unacknowledged) for bot in group)
        label = "ack (require_ack)" if acks else "plain (no ack)"
        print(
            f"{label:<22} {len(acknowledged):>12} {len(lost):>5} {len(silent):>7} {duplicates:>10} "
            f"{twice:>10} {pending:>14}"
        )
    statuses = collections.Counter(stored.values())
    print(f"database: {dict(statuses)}")
    files = PayloadFiles.beside(database)
    with sqlite3.connect(database) as db:
        in_files = {row[0] for row in db.execute("SELECT object_id FROM requests WHERE payload_file = 1")}
        unreadable = db.execute(
            "SELECT count(*) FROM requests WHERE status = 'error' AND result LIKE '%stored payload%'"
        ).fetchone()[0]
    on_disk = files.stored_ids()
    print(
        f"payload files: {len(in_files)} requests keep theirs in one; missing {len(in_files - on_disk)}, "
        f"named by no request {len(on_disk - in_files)}; requests ended for an unreadable payload: {unreadable}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--bots", type=int, default=4)
    parser.add_argument("--image-share", type=float, default=0.0, help="share of img2img requests with an image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        started = time.monotonic()
        bots = asyncio.run(run_cycles(args.cycles, args.bots, workdir, args.image_share))
        report(bots, workdir / "chaos.sqlite3", args.cycles)
        print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
