"""The websocket gateway: who may connect, and what happens to each message they send.

A request's path here: decode_message -> Intake.job_from_request (schema + payload contract) ->
Intake.accept (committed, `queued` answered, queued for the scheduler). A bad message is
answered (an error `response` when its executor and gen_type are valid, an `info` message
otherwise) and the connection carries on.

A connection opened with `?receive=own` is private: it gets answers only for the requests
sent on it (they are never handed to the service's other connections) and none of the
service's waiting finals. The command-line client connects that way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from app import keys
from app.domain.errors import InvalidRequest, Refusal
from app.domain.ids import new_object_id
from app.domain.jobs import LARGE_PAYLOAD_CHARS, Job
from app.domain.lifecycle import CancelOutcome
from app.domain.secrets_match import secret_matches
from app.web.byte_budget import ByteBudget
from app.web.corked_transport import CorkedTransport
from app.web.schemas import (
    bounded_errors,
    decode_message,
    info_message,
    parse_action,
    parse_request,
    readable_envelope,
    rejection_response,
)

log = logging.getLogger(__name__)

Read = TypeVar("Read")  # what a reader given to read_off_the_loop_if_long returns

# What one connection may have between receipt and the `queued` answers: each request counts
# its frame's bytes, at least PENDING_CHARGE_MIN, so at most 2,048 small requests or 16 MiB of
# larger ones. Past this the gateway stops reading that socket until commits catch up
# (backpressure, bounded memory). With one connection pipelining small requests, 2,048 rather
# than 512 in flight let batches grow from ~160 to ~320 requests and intake from 5,500-6,100
# to 6,150-7,200 requests/s (3 of 4 interleaved runs), at less CPU per request; the most one
# connection holds fell from 512 frames of up to 256 KiB (128 MiB) to 16 MiB.
MAX_PENDING_BYTES = 16 * 1024 * 1024
PENDING_CHARGE_MIN = 8 * 1024
# aiohttp drops a connection whose frame passes its limit, and the client only sees the
# close. Frames up to twice MAX_MESSAGE_BYTES are read and refused with a readable answer.
FRAME_LIMIT_FACTOR = 2
HEARTBEAT_S = 30.0
# Frames longer than this are parsed and checked in a worker thread (about 10 ms of work), and
# count against LARGE_MESSAGES_BYTES until they are committed.
OFFLOAD_FRAME_BYTES = 256 * 1024
# Large messages held between receipt and commit, all connections together (byte_budget.py).
LARGE_MESSAGES_BYTES = 32 * 1024 * 1024
# settings / service_info of an oversized message are echoed in its refusal up to this size.
MAX_ECHOED_ENVELOPE_CHARS = 64 * 1024
SHUTTING_DOWN = "The server is shutting down: this request was not queued. Send it again once the server is back."
CANCEL_ANSWERS = {
    CancelOutcome.CANCELLED: "cancelled",
    CancelOutcome.FINISHING: "Too late to cancel: the request has finished and its answer is on its way.",
    CancelOutcome.NOT_FOUND: "No queued or running request of this service has that object_id.",
}


def authenticate(request: web.Request) -> str:
    """Return the service of a connecting client, or raise 401 before the upgrade.

    The service comes from the `service` header or the `/ws/{service}` path (both must agree
    when both are given); the key from the `authorization` header.
    """
    services = request.app[keys.CONFIG].services
    path_service = request.match_info.get("service")
    header_service = request.headers.get("service")
    if path_service and header_service and path_service != header_service:
        raise web.HTTPUnauthorized(text="Service in the path and the service header differ.")
    service = header_service or path_service or ""
    expected = services.get(service)
    given = request.headers.get("authorization", "")
    # Compared even for unknown services, so timing does not tell which names exist.
    if not secret_matches(given, expected or "\0") or expected is None:
        log.info("refused a websocket connection for service %r from %s", service, request.remote)
        raise web.HTTPUnauthorized(text="Service or key is not valid.")
    return service


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    service = authenticate(request)
    config = request.app[keys.CONFIG]
    hub = request.app[keys.HUB]
    # No permessage-deflate: compressing multi-MB base64 images costs 10-20x the CPU.
    # +1: a frame of exactly twice the limit is still read, and refused readably.
    # decode_text=False: a text frame comes as its UTF-8 bytes, which the JSON parser reads
    # (and checks) as they are; decoding a megabyte into a str first was one more pass over it.
    ws = web.WebSocketResponse(
        max_msg_size=config.max_message_bytes * FRAME_LIMIT_FACTOR + 1,
        compress=False,
        heartbeat=HEARTBEAT_S,
        decode_text=False,
    )
    private = request.query.get("receive") == "own"
    await ws.prepare(request)
    assert request.transport is not None  # a request being served has its connection
    # Frames sent in one pass of the loop leave in one socket write (app/web/corked_transport.py).
    hub.add(service, ws, CorkedTransport.install(ws, request.transport), private=private)
    if private:
        log.info("%s connected from %s (private: its own requests only)", service, request.remote)
    else:
        log.info("%s connected from %s (%d open)", service, request.remote, hub.connection_count(service))
    connection = _Connection(request.app, service, ws, private=private)
    backlog = None if private else asyncio.create_task(hub.deliver_backlog(service, ws))
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await connection.on_text(message.data)
            elif message.type is WSMsgType.BINARY:
                await hub.send_to(
                    ws,
                    info_message("error", "Binary frames are not accepted: send each request as a JSON text message."),
                )
            elif message.type is WSMsgType.ERROR:
                log.info("%s connection error: %s", service, ws.exception())
    finally:
        hub.discard(service, ws)
        await connection.drain()
        if backlog is not None:
            await backlog
        log.info("%s disconnected (close code %s)", service, ws.close_code)
    return ws


class _Connection:
    """Per-connection state: the accepts in flight on it."""

    def __init__(self, app: web.Application, service: str, ws: web.WebSocketResponse, *, private: bool) -> None:
        self._app = app
        self._service = service
        self._ws = ws
        # Requests sent on a private connection are answered only to their own client.
        self._channel = "http" if private else "ws"
        self._limit = app[keys.CONFIG].max_message_bytes
        self._pending = ByteBudget(MAX_PENDING_BYTES)
        self._accepts: set[asyncio.Task[None]] = set()
        # Requests read in the current pass of the loop, accepted together at its end, and
        # what they hold of the pending budget.
        self._arrived: list[Job] = []
        self._arrived_charge = 0
        # Done once the last burst started has sent its answers (turn).
        self._answered: asyncio.Future[None] | None = None

    async def on_text(self, frame: bytes) -> None:
        """One text frame, as its UTF-8 bytes."""
        if len(frame) <= OFFLOAD_FRAME_BYTES:
            await self._on_text(frame, 0)
            return
        budget = self._app[keys.LARGE_MESSAGES]
        held = await budget.take(len(frame))
        try:
            held = await self._on_text(frame, held)
        finally:
            if held:
                budget.give(held)

    async def _on_text(self, frame: bytes, held: int) -> int:
        """Answer or accept one message; returns the budget still to give back (0 when an
        accept task took it over)."""
        hub = self._app[keys.HUB]
        try:
            if len(frame) > self._limit:
                # Still parsed, so the refusal can name the request it belongs to.
                _refuse_oversized(frame, self._limit)
            message, request = await read_off_the_loop_if_long(_read_frame, frame)
            if request is None:
                await self._on_action(message)
                return held
            job = self._app[keys.INTAKE].job_from_request(
                self._service, request, origin=self._ws, channel=self._channel
            )
        except InvalidRequest as exc:
            await hub.send_to(self._ws, self._rejection(exc))
            return held
        # Commits are grouped: accepting concurrently lets one transaction carry many requests.
        charge = await self._pending.take(max(len(frame), PENDING_CHARGE_MIN))
        if hub.closing:  # shutdown has begun (perhaps while this waited for room)
            self._pending.give(charge)
            await hub.send_to(
                self._ws,
                self._rejection(
                    InvalidRequest(SHUTTING_DOWN, envelope=readable_envelope(message), refusal=Refusal.SHUTTING_DOWN)
                ),
            )
            return held
        if not held and job.request_key is None and len(frame) < LARGE_PAYLOAD_CHARS:
            # The usual request: accepted together with those arriving in this pass of the
            # loop, by one task (Intake.accept_together). A frame this short carries a payload
            # kept in its row; the store would also take one kept in a file there.
            if not self._arrived:
                asyncio.get_running_loop().call_soon(self._accept_arrived)
            self._arrived.append(job)
            self._arrived_charge += charge
            return 0
        self._start(self._accept(job, held), charge)
        return 0

    def _accept_arrived(self) -> None:
        if self._arrived:
            jobs, charge, self._arrived, self._arrived_charge = self._arrived, self._arrived_charge, [], 0
            self._start(self._accept_together(jobs), charge)

    def _start(self, accepting: Coroutine[Any, Any, None], charge: int) -> None:
        """Run an accept (holding `charge` of this connection's pending budget) as a task the
        shutdown waits for."""
        task = asyncio.create_task(accepting)
        self._accepts.add(task)
        self._app[keys.HUB].accepts.add(task)
        task.add_done_callback(functools.partial(self._accept_done, charge))

    async def _on_action(self, message: dict) -> None:
        """Additive client actions, each answered with an info message of its name:
        `cancel` (a cancelled request also gets its final `error` response, "cancelled") and
        `ack` (the final answer of a require_ack request was received)."""
        action, object_id = parse_action(message)
        hub = self._app[keys.HUB]
        if action == "ack":
            acked = await hub.acknowledge(self._service, object_id)
            await hub.send_to(
                self._ws,
                info_message(
                    "ack",
                    "acked" if acked else "No finished request of this service has that object_id.",
                    object_id=object_id,
                    outcome="acked" if acked else "not_found",
                ),
            )
            return
        outcome = await self._app[keys.SCHEDULER].cancel_request(self._service, object_id)
        await hub.send_to(
            self._ws, info_message("cancel", CANCEL_ANSWERS[outcome], object_id=object_id, outcome=outcome.value)
        )

    def _accept_done(self, charge: int, task: asyncio.Task[None]) -> None:
        self._accepts.discard(task)
        self._app[keys.HUB].accepts.discard(task)
        self._pending.give(charge)

    async def _accept(self, job: Job, held: int) -> None:
        try:
            await self._accept_and_answer(job)
        finally:
            if held:  # committed (or refused): its memory is the store's now, or free
                self._app[keys.LARGE_MESSAGES].give(held)

    async def _accept_and_answer(self, job: Job) -> None:
        try:
            await self._app[keys.INTAKE].accept(job, self.announce)
        except Exception as exc:
            await self.refused(job, exc)

    async def _accept_together(self, jobs: list[Job]) -> None:
        await self._app[keys.INTAKE].accept_together(jobs, self)

    def at_once(self) -> AbstractContextManager[bool]:
        return self._app[keys.HUB].sending_at_once(self._ws)

    def turn(self) -> BurstTurn:
        """Entered once every burst read before this one has sent its answers (Intake.Answering)."""
        before = self._answered
        self._answered = asyncio.get_running_loop().create_future()
        return BurstTurn(before, self._answered)

    async def announce(self, message: dict) -> None:
        await self._app[keys.HUB].send_to(self._ws, message)

    async def refused(self, job: Job, why: Exception) -> None:
        """Tell the client its request was not queued: a limit or moderation said no
        (InvalidRequest), or it could not be stored."""
        if isinstance(why, InvalidRequest):
            refusal = why
        else:
            log.error("%s could not be stored", job.object_id, exc_info=why)
            refusal = InvalidRequest(
                f"The request could not be stored, it was not queued: {why}",
                envelope=job.envelope(),
                refusal=Refusal.NOT_STORED,
            )
        self._app[keys.METRICS].request_refused(refusal.code, self._service)
        await self._app[keys.HUB].send_to(self._ws, rejection_response(job.object_id, self._service, refusal))

    def _rejection(self, error: InvalidRequest) -> dict:
        # %r: the reason may quote client text (key names); repr keeps it on one log line.
        log.info("refused a message from %s: %r", self._service, error.reason[:300])
        self._app[keys.METRICS].request_refused(error.code, self._service)
        if error.envelope:
            return rejection_response(new_object_id(), self._service, error)
        return info_message("error", error.reason, errors=bounded_errors(error.field_errors) or None, code=error.code)

    async def drain(self) -> None:
        """Let accepts already started finish: their requests are committed and will run."""
        self._accept_arrived()  # those read in the current pass of the loop, not started yet
        if self._accepts:
            await asyncio.wait(set(self._accepts))


class BurstTurn:
    """A burst's turn to answer: entered when the burst before it is done answering, and done
    itself on leaving. Bots sending one request at a time take a turn per request: as an
    @asynccontextmanager waiting through asyncio.wait even when the turn before was over, a turn
    cost 23 us (warm); this class, which skips a finished turn, costs 2 us."""

    __slots__ = ("_answered", "_before")

    def __init__(self, before: asyncio.Future[None] | None, answered: asyncio.Future[None]) -> None:
        self._before = before
        self._answered = answered

    async def __aenter__(self) -> None:
        before = self._before
        if before is None or before.done():
            return
        try:
            await asyncio.wait((before,))  # not `await before`: a cancelled wait would cancel it
        except BaseException:
            # Cancelled before its turn (__aexit__ is not called then): the next burst's turn
            # still comes after the one before this.
            before.add_done_callback(lambda _: self._answered.set_result(None))
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._answered.set_result(None)


async def read_off_the_loop_if_long(read: Callable[[bytes], Read], data: bytes) -> Read:
    """`read(data)`, in a worker thread when the data is over OFFLOAD_FRAME_BYTES: parsing and
    checking megabytes takes long enough to stall every other connection and /health, so the
    loop keeps serving meanwhile. `read` must touch no shared state."""
    if len(data) > OFFLOAD_FRAME_BYTES:
        return await asyncio.to_thread(read, data)
    return read(data)


def _read_frame(frame: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(message, checked request), or (message, None) for a client action. Raises
    InvalidRequest. Touches no shared state: it may run in a worker thread."""
    message = decode_message(frame)
    if message.get("message_type") == "info" and "action" in message:
        return message, None
    return message, parse_request(message)


def _refuse_oversized(frame: bytes, limit: int) -> None:
    reason = f"Message is {len(frame)} bytes, over this server's limit of {limit} bytes (MAX_MESSAGE_BYTES)."
    try:
        message = decode_message(frame)
    except InvalidRequest:
        message = {}
    envelope = readable_envelope(message)
    # The oversized payload is not echoed back (the client's own frame limit may be lower),
    # nor anything else that is large.
    envelope.pop("payload", None)
    for name in ("settings", "service_info"):
        if name in envelope and len(json.dumps(envelope[name])) > MAX_ECHOED_ENVELOPE_CHARS:
            del envelope[name]
    raise InvalidRequest(reason, envelope=envelope, refusal=Refusal.MESSAGE_TOO_LARGE)
