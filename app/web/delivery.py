"""Open websocket connections per service, and getting every answer to exactly one of them.

The guarantee (also in README, "Delivery"):

- A final (ok/error) message is committed before it is sent. It is handed to one connection
  of its service: the one the request came in on, else another. Handing over is claimed in
  memory first (`_handing`), so however many connections open at once, each owed final goes to
  one of them; a claim is released if that socket fails, and the final stays owed.
- It is marked delivered once sent. If no connection is open it waits in SQLite and is sent
  when one opens. Within one run of the server a final is sent once; a crash between sending
  and marking means it is sent once more after the restart (at-least-once across crashes).
- A request sent with `settings.require_ack` counts as delivered only when the client
  acknowledges it (`{"message_type": "info", "action": "ack", "object_id": ...}`). Until then
  it is sent again when the connection that had it closes (to another open connection of the
  service), and to the first connection after a restart.
- Private connections (`/ws...?receive=own`, the command-line client) receive answers only for
  the requests sent on them, and none of the service's waiting finals.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from app.backends.base import Progress
from app.domain import json_text
from app.domain.jobs import Job
from app.storage.store import Store
from app.web.corked_transport import CorkedTransport
from app.web.schemas import final_response, info_message, short_response

log = logging.getLogger(__name__)

# A message this much smaller than the transport's pause threshold (64 KiB) cannot make the
# send wait for the client, so it is sent without arming a SEND_TIMEOUT_S timer.
UNTIMED_SEND_BYTES = 32 * 1024


class ConnectionHub:
    def __init__(self, store: Store, send_timeout_s: float = 30.0) -> None:
        self._store = store
        self._send_timeout_s = send_timeout_s
        # Each connection's transport, to cut off a client that stopped reading.
        self._transports: dict[web.WebSocketResponse, CorkedTransport] = {}
        # Shared connections: any answer of their service may go to them (bot shards).
        self._connections: dict[str, set[web.WebSocketResponse]] = defaultdict(set)
        # Private connections: only answers of requests sent on them.
        self._private: set[web.WebSocketResponse] = set()
        # Finals being handed to a connection right now (sent, then marked delivered), or
        # reserved for live delivery from just before their commit until it is done.
        self._handing: set[str] = set()
        # object_id -> the connection holding a require_ack final until the client acks it.
        self._awaiting_ack: dict[str, web.WebSocketResponse] = {}
        # Accepts in flight on every connection (requests committed or being committed whose
        # `queued` is not sent yet): shutdown waits for them before closing sockets.
        self.accepts: set[asyncio.Task[None]] = set()
        self.closing = False
        self._handovers: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"<ConnectionHub { ({s: len(c) for s, c in self._connections.items() if c}) } "
            f"private={len(self._private)} awaiting_ack={len(self._awaiting_ack)}>"
        )

    def add(
        self,
        service: str,
        ws: web.WebSocketResponse,
        transport: CorkedTransport | None = None,
        *,
        private: bool = False,
    ) -> None:
        # Several connections per service live side by side; none evicts another.
        if transport is not None:
            self._transports[ws] = transport
        if private:
            self._private.add(ws)
        else:
            self._connections[service].add(ws)

    def discard(self, service: str, ws: web.WebSocketResponse) -> None:
        """A connection closed. Finals it held unacknowledged go to another connection."""
        self._private.discard(ws)
        self._connections[service].discard(ws)
        self._transports.pop(ws, None)
        orphaned = [
            object_id for object_id, held in self._awaiting_ack.items() if held is ws and object_id not in self._handing
        ]  # those: see _release
        for object_id in orphaned:
            del self._awaiting_ack[object_id]
        if orphaned:
            self._rehome(service)

    def _rehome(self, service: str) -> None:
        """Unacknowledged finals lost their connection: offer them to another open one."""
        if not self._connections[service] or self.closing:
            return  # the next connection's backlog has them
        other = next(iter(self._connections[service]))
        task = asyncio.create_task(self.deliver_backlog(service, other))
        self._handovers.add(task)
        task.add_done_callback(self._handovers.discard)

    def _is_open(self, ws: web.WebSocketResponse, service: str) -> bool:
        return not ws.closed and (ws in self._connections[service] or ws in self._private)

    def _release(self, jobs: list[Job]) -> None:
        """Hand-over of `jobs` is over. An unacknowledged final whose connection closed
        while it was being handed over (so `discard` did not offer it again) is offered again."""
        self._handing.difference_update(job.object_id for job in jobs)
        for job in jobs:
            held = self._awaiting_ack.get(job.object_id)
            if held is not None and not self._is_open(held, job.service):
                del self._awaiting_ack[job.object_id]
                self._rehome(job.service)

    def connection_count(self, service: str) -> int:
        return len(self._connections[service])

    def sending_at_once(self, ws: web.WebSocketResponse) -> AbstractContextManager[bool]:
        """A block in which no send_to(ws) waits for the client, so no other task runs
        between them (True); False when one could (CorkedTransport.sends_at_once)."""
        transport = self._transports.get(ws)
        if transport is None or ws.closed:
            return nullcontext(False)
        return transport.sends_at_once()

    async def send_to(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> bool:
        """Send one message; False if the connection is gone. A client that does not read
        what it is sent within SEND_TIMEOUT_S is cut off: its send buffer is bounded by the
        socket's, no waiting message piles up behind it, and its finals (not marked
        delivered) wait in SQLite for its reconnect."""
        if ws.closed:
            return False
        data = json_text.dumps_bytes(message)
        transport = self._transports.get(ws)
        try:
            if transport is not None and transport.get_write_buffer_size() + len(data) < UNTIMED_SEND_BYTES:
                # The socket's buffer takes it without waiting: no timer needed (the usual case).
                await ws.send_frame(data, WSMsgType.TEXT)
                return True
            async with asyncio.timeout(self._send_timeout_s):
                await ws.send_frame(data, WSMsgType.TEXT)
        except TimeoutError:
            log.warning(
                "a connection did not read for %g s (SEND_TIMEOUT_S): closed; its answers wait for a reconnect",
                self._send_timeout_s,
            )
            if transport is not None:
                transport.abort()
            return False
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send failed on a closing connection: %s", exc)
            return False
        return True

    def _receivers(self, job: Job) -> list[web.WebSocketResponse]:
        """Where answers of `job` may go, best first."""
        if job.channel != "ws":
            # Its own client only: the private websocket it came on, if any (else it is fetched).
            return [job.origin] if job.origin is not None else []
        candidates = [job.origin] if job.origin is not None else []
        return candidates + [ws for ws in self._connections[job.service] if ws is not job.origin]

    async def send_for_job(self, job: Job, message: dict[str, Any]) -> bool:
        return await self._send_to_first(self._receivers(job), message) is not None

    async def _send_to_first(
        self, receivers: list[web.WebSocketResponse], message: dict[str, Any]
    ) -> web.WebSocketResponse | None:
        """Send `message` to the first receiver that takes it; which one, or None."""
        for ws in receivers:
            if await self.send_to(ws, message):
                return ws
        return None

    # JobListener, called by the scheduler.

    async def job_generating(self, job: Job, avg_time_s: float) -> None:
        await self.send_for_job(job, short_response(job, "generating", avg_time_s))

    async def job_progress(self, job: Job, progress: Progress) -> None:
        await self.send_for_job(
            job,
            info_message(
                "progress",
                f"{progress.fraction:.0%}",
                object_id=job.object_id,
                progress=round(progress.fraction, 3),
                eta_relative=round(progress.eta_s, 1) if progress.eta_s is not None else None,
            ),
        )

    async def job_retrying(self, job: Job, reason: str, delay_s: float) -> None:
        await self.send_for_job(
            job,
            info_message(
                "retrying", reason, object_id=job.object_id, attempt=job.attempts, retry_in_s=round(delay_s, 1)
            ),
        )

    async def job_eta(self, job: Job, eta_s: float) -> None:
        await self.send_for_job(
            job,
            info_message("eta", f"New estimate: ready in about {eta_s:.0f} s.", object_id=job.object_id, eta_s=eta_s),
        )

    async def job_storage_retry(self, job: Job, reason: str) -> None:
        await self.send_for_job(
            job,
            info_message(
                "storage_retry",
                "The server's database is not taking writes right now "
                f"({reason}); the request is kept and its progress is recorded as soon as it does.",
                object_id=job.object_id,
            ),
        )

    def reserve_final(self, job: Job) -> None:
        """Called before a final is committed: from then until `job_finished` (or
        `release_final`), no connection's backlog takes it, so it is sent once."""
        self._handing.add(job.object_id)

    def release_final(self, job: Job) -> None:
        self._handing.discard(job.object_id)

    async def job_finished(self, job: Job) -> None:
        """Hand a just-committed final (reserved by reserve_final) to a receiver."""
        try:
            if job.channel != "ws" and job.origin is None:
                return  # fetched by its client, and marked delivered then
            if not await self._send_finals([job], self._receivers(job)):
                log.info("%s: no connection took its answer; it waits for the next one", job.object_id)
        finally:
            self._release([job])

    async def deliver_backlog(self, service: str, ws: web.WebSocketResponse) -> int:
        """Send `ws` every final of `service` still owed and not being handed to (or held by)
        another open connection. Returns how many were sent."""
        owed = []
        for job in await self._store.reads.owed_finals(service):
            held = self._awaiting_ack.get(job.object_id)
            if job.object_id in self._handing or (held is not None and self._is_open(held, service)):
                continue
            owed.append(job)
        # Claimed before the first await, so a connection opening at the same moment skips them.
        self._handing.update(job.object_id for job in owed)
        try:
            sent = await self._send_finals(owed, [ws])
        finally:
            self._release(owed)
        if sent:
            log.info("delivered %d waiting results to a new %s connection", sent, service)
        return sent

    async def _send_finals(self, jobs: list[Job], receivers: list[web.WebSocketResponse]) -> int:
        """Send each final (claimed by the caller) to the first receiver that takes it, then
        mark those sent delivered. Returns how many were sent."""
        sent: list[Job] = []
        try:
            for job in jobs:
                ws = await self._send_to_first(receivers, final_response(job))
                if ws is None:
                    break  # no receiver takes anything now: the rest stay owed
                sent.append(job)
                if job.ack_required:
                    self._awaiting_ack[job.object_id] = ws
            await self._store.mark_delivered(sent)
        except Exception:
            # Not marked (the database refused the write): they stay owed and are sent again
            # to the next connection, which is what at-least-once allows.
            log.exception("marking %d finals delivered failed", len(sent))
        return len(sent)

    async def answer_repeat(self, job: Job, ws: web.WebSocketResponse) -> None:
        """A request repeated the idempotency key of `job`, which is final. Its final is sent
        to `ws` (a client that resends did not see it), unless it is being handed to a
        connection right now: then `ws` is told so, and the final arrives through that."""
        if job.object_id in self._handing:
            await self.send_to(
                ws,
                info_message(
                    "duplicate",
                    "A request with this request_id was queued before; its final answer "
                    "is being sent (or was just sent) to a connection of this service.",
                    object_id=job.object_id,
                ),
            )
            return
        self._handing.add(job.object_id)
        try:
            await self._send_finals([job], [ws])
        finally:
            self._release([job])

    async def acknowledge(self, service: str, object_id: str) -> bool:
        """The client acknowledged a final. True if it was a final of `service` (acked now or
        before); False for an unknown or unfinished request or another service's."""
        job = await self._store.reads.get(object_id)
        if job is None or job.service != service or not job.status.is_final:
            return False
        self._awaiting_ack.pop(object_id, None)
        await self._store.mark_acked(job)
        return True

    async def finish_accepts(self) -> None:
        """Shutdown, first step: take no new requests, and let those being committed get
        their `queued` answer before any socket closes."""
        self.closing = True
        if self.accepts:
            await asyncio.wait(set(self.accepts))

    async def close_all(self) -> None:
        for task in list(self._handovers):
            task.cancel()
        for ws in [ws for connections in self._connections.values() for ws in connections] + list(self._private):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
