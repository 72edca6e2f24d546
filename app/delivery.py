"""Open websocket connections per service, and getting every answer to one of them.

A final (ok/error) message is committed before it is sent and marked delivered after a
connection of its service took it. If none is connected, it waits in SQLite and is sent
when the service connects again. A crash between sending and marking means it is sent
once more (same object_id): twice is possible, never zero times.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

from aiohttp import WSCloseCode, web

from app.backends.base import Progress
from app.jobs import Job
from app.schemas import final_response, info_message, short_response
from app.store import Store

log = logging.getLogger(__name__)


class ConnectionHub:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._connections: dict[str, set[web.WebSocketResponse]] = defaultdict(set)

    def __repr__(self) -> str:
        return f"<ConnectionHub {({s: len(c) for s, c in self._connections.items() if c})}>"

    def add(self, service: str, ws: web.WebSocketResponse) -> None:
        # Several connections per service (bot shards) live side by side; none evicts another.
        self._connections[service].add(ws)

    def discard(self, service: str, ws: web.WebSocketResponse) -> None:
        self._connections[service].discard(ws)

    def connection_count(self, service: str) -> int:
        return len(self._connections[service])

    async def send_to(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> bool:
        """Send one message; False if the connection is gone."""
        if ws.closed:
            return False
        try:
            await ws.send_str(json.dumps(message))
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send failed on a closing connection: %s", exc)
            return False
        return True

    async def send_for_job(self, job: Job, message: dict[str, Any]) -> bool:
        """Send to the connection the job came in on, else to any of its service's. Requests
        submitted over HTTP are fetched by their client, never pushed."""
        if job.channel != "ws":
            return False
        candidates = [job.origin] if job.origin is not None else []
        candidates += [ws for ws in self._connections[job.service] if ws is not job.origin]
        for ws in candidates:
            if await self.send_to(ws, message):
                return True
        return False

    # JobListener, called by the scheduler.

    async def job_generating(self, job: Job, avg_time_s: float) -> None:
        await self.send_for_job(job, short_response(job, "generating", avg_time_s))

    async def job_progress(self, job: Job, progress: Progress) -> None:
        await self.send_for_job(job, info_message(
            "progress", f"{progress.fraction:.0%}", object_id=job.object_id,
            progress=round(progress.fraction, 3),
            eta_relative=round(progress.eta_s, 1) if progress.eta_s is not None else None))

    async def job_retrying(self, job: Job, reason: str, delay_s: float) -> None:
        await self.send_for_job(job, info_message(
            "retrying", reason, object_id=job.object_id, attempt=job.attempts,
            retry_in_s=round(delay_s, 1)))

    async def job_finished(self, job: Job) -> None:
        if job.channel != "ws":
            return  # marked delivered when its client fetches it
        if await self.send_for_job(job, final_response(job)):
            await self._store.mark_delivered([job])
        else:
            log.info("%s: no %s connection open; the result waits for the next one",
                     job.object_id, job.service)

    async def deliver_backlog(self, service: str, ws: web.WebSocketResponse) -> int:
        """Send `ws` every final message of `service` not yet delivered. Returns how many."""
        delivered: list[Job] = []
        for job in await self._store.undelivered_jobs(service):
            if not await self.send_to(ws, final_response(job)):
                break
            delivered.append(job)
        if delivered:
            await self._store.mark_delivered(delivered)
            log.info("delivered %d waiting results to a new %s connection", len(delivered), service)
        return len(delivered)

    async def close_all(self) -> None:
        for connections in self._connections.values():
            for ws in list(connections):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
