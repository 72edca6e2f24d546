"""Taking in one generation request, the same way for the websocket and the HTTP API:
validate it, commit it, tell the client `queued`, hand it to the scheduler. `Intake` holds
exactly what that needs: the store, the scheduler, and delivery (for resent requests whose
final answer exists)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol

from app.domain.costs import job_cost_units
from app.domain.errors import InvalidRequest, Refusal
from app.domain.ids import new_object_id
from app.domain.jobs import ExecutorType, Job
from app.engine.admission import Admission
from app.engine.estimates import BurstReading
from app.engine.scheduler import Scheduler
from app.storage.store import Store
from app.web.delivery import ConnectionHub
from app.web.schemas import final_response, info_message, parse_request, short_response

log = logging.getLogger(__name__)

Announce = Callable[[dict[str, Any]], Awaitable[Any]]
# A request's commit handed to the store (Store.submit_add).
Commit = asyncio.Future[None] | Coroutine[Any, Any, None]


class Answering(Protocol):
    """The connection a burst came on, as Intake.accept_together answers it (the gateway's)."""

    async def announce(self, message: dict[str, Any]) -> Any:
        """Send `message`."""

    async def refused(self, job: Job, why: Exception) -> None:
        """Tell the client `job` was not queued, and why."""

    def at_once(self) -> AbstractContextManager[bool]:
        """A block in which no send waits for the client, or False (ConnectionHub.sending_at_once)."""

    def turn(self) -> AbstractAsyncContextManager[None]:
        """A block entered once the bursts read before this one on the connection have sent
        their answers."""


class Intake:
    def __init__(self, store: Store, scheduler: Scheduler, hub: ConnectionHub, admission: Admission) -> None:
        self._store = store
        self._scheduler = scheduler
        self._hub = hub
        self._admission = admission
        self._queued_lines = _QueuedLines()

    def build_job(self, service: str, message: dict[str, Any], *, origin: Any = None, channel: str = "ws") -> Job:
        """A Job from a request message. Raises InvalidRequest (with what could be read of the
        message) when it is malformed or no backend of its executor type is configured."""
        return self.job_from_request(service, parse_request(message), origin=origin, channel=channel)

    def job_from_request(
        self, service: str, request: dict[str, Any], *, origin: Any = None, channel: str = "ws"
    ) -> Job:
        """A Job from a request already checked by schemas.parse_request."""
        executor = request["executor"]
        if not self._scheduler.fleet.has_backends(executor):
            raise InvalidRequest(
                f"No {executor.value} backend is configured on this server.",
                envelope=request,
                refusal=Refusal.NO_BACKEND,
            )
        request_id = request["service_info"].get("request_id")
        return Job(
            object_id=new_object_id(),
            service=service,
            executor=executor,
            gen_type=request["gen_type"],
            premium=request["flags"]["premium"],
            settings=request["settings"],
            service_info=request["service_info"],
            payload=request["payload"],
            created_at=time.time(),
            origin=origin,
            channel=channel,
            unknown_fields=request["unknown_fields"],
            ack_required=request["flags"]["require_ack"],
            request_key=json.dumps(request_id) if request_id is not None else None,
        )

    async def accept(self, job: Job, announce: Announce) -> dict[str, Any]:
        """Commit `job`, announce its `queued` answer (then an `unknown_field` notice when its
        payload has keys the backend does not know, and a `no_backend` notice when no backend of
        its type is in service), then queue it. Returns the `queued` answer.

        A request whose `service_info.request_id` this service used before is not queued again:
        the original's current state is announced and returned instead (idempotent resends).

        Raises InvalidRequest (its `refusal` says why) when a limit or moderation refuses it,
        and whatever the store raises when it could not be committed; nothing was queued then.
        """
        store = self._store
        if job.request_key is not None:
            original = await store.reads.find_by_request_key(job.service, job.request_key)
            if original is not None:
                return await self._answer_repeat(original, job, announce)
        self._admit(job)
        try:
            await store.add(job)
        except sqlite3.IntegrityError:
            self._drop(job)
            # The same key arrived twice at once: the other one was committed first.
            original = await store.reads.find_by_request_key(job.service, job.request_key) if job.request_key else None
            if original is None:
                raise
            return await self._answer_repeat(original, job, announce)
        except BaseException:
            self._drop(job)
            raise
        self._queued_lines.add([job])
        return await self._queue_committed(job, announce)

    async def accept_together(self, jobs: list[Job], answering: Answering) -> None:
        """`accept` for requests that arrived together on one connection, none with a
        request_id (the gateway sees to that).
        Every one is handed to the store before any commit is awaited, and one task sees them
        through: a burst costs one wake-up instead of one task per request. Each gets what
        `accept` would give it, in arrival order: its `queued` after its commit, or
        `answering.refused(job, why)` (InvalidRequest from a limit or moderation, or what the
        store raised). Bursts of one connection answer in the order they arrived
        (`answering.turn()`): a send that waits for a slow reader let the next burst's
        answers overtake the rest of this one's."""
        # Each request's commit under way, or why it was refused; answered in arrival order.
        outcomes = self._commit_together(jobs)
        queued: list[Job] = []
        try:
            async with answering.turn():
                await self._answer_together(outcomes, queued, answering)
        finally:
            # Once for the whole burst, after its answers: every `queued` still precedes its
            # `generating`, and the dispatcher's look for a free backend (two pools, each
            # slot) is not repeated per request.
            if queued:
                self._scheduler.dispatch()
        self._queued_lines.add(queued)

    def _commit_together(self, jobs: list[Job]) -> list[tuple[Job, Commit | Exception]]:
        """Each request admitted and handed to the store (or why it was refused), in order."""
        outcomes: list[tuple[Job, Commit | Exception]] = []
        for job in jobs:
            try:
                self._admit(job)
            except InvalidRequest as exc:
                outcomes.append((job, exc))
                continue
            try:
                outcomes.append((job, self._store.submit_add(job)))
            except Exception as exc:  # the store is closed (shutdown)
                self._drop(job)
                outcomes.append((job, exc))
        return outcomes

    async def _answer_together(
        self, outcomes: list[tuple[Job, Commit | Exception]], queued: list[Job], answering: Answering
    ) -> None:
        """Each request's commit awaited in order. Those settled (committed, or refused) are
        answered together before a commit that is still under way is awaited, so the first
        answers of a burst written in several transactions wait for none but their own."""
        settled: list[tuple[Job, Exception | None]] = []
        for index, (job, outcome) in enumerate(outcomes):
            if isinstance(outcome, Exception):
                settled.append((job, outcome))
                continue
            if settled and not (isinstance(outcome, asyncio.Future) and outcome.done()):
                await self._answer_settled(settled, queued, answering)
                settled = []
            try:
                await outcome
            except Exception as exc:
                self._drop(job)
                settled.append((job, exc))
                continue
            except BaseException:
                # Only a wait is interrupted, and `settled` was answered before it.
                for left, commit in outcomes[index:]:
                    if isinstance(commit, Coroutine):
                        commit.close()  # a payload file not written yet: nothing was handed over
                    if not isinstance(commit, Exception):
                        self._drop(left)  # one handed to the writer is still committed
                raise
            settled.append((job, None))
        if settled:
            await self._answer_settled(settled, queued, answering)

    async def _answer_settled(
        self, settled: list[tuple[Job, Exception | None]], queued: list[Job], answering: Answering
    ) -> None:
        """Settled requests of a burst answered in arrival order: each committed one told its
        `queued` and put in line (appended to `queued`), each other one refused. Several are
        answered in passes when the connection takes every answer without waiting
        (_answer_in_passes); otherwise each request is put in line only after its `queued` is
        sent, as `accept` does."""
        if len(settled) > 1:
            with answering.at_once() as unhindered:
                if unhindered:
                    await self._answer_in_passes(settled, queued, answering)
                    return
        for job, why in settled:
            if why is not None:
                await answering.refused(job, why)
                continue
            queued.append(job)
            try:
                await self._queue_committed(job, answering.announce, dispatch=False)
            except Exception:
                _log_not_queued(job)

    async def _answer_in_passes(
        self, settled: list[tuple[Job, Exception | None]], queued: list[Job], answering: Answering
    ) -> None:
        """Every request estimated and put in line, then every answer sent. Interleaved per
        request, the same work took ~15 % more of the event loop's time (50 connections of
        pipelined requests). The order of messages is the same as one by one, because the
        caller holds the connection's at-once block (no send waits, so no other task runs in
        between) and nothing is dispatched before the burst's answers are sent
        (accept_together dispatches after them)."""
        told: list[tuple[Job, Exception | list[dict[str, Any]]]] = []
        no_backend: dict[ExecutorType, str | None] = {}
        burst = BurstReading()
        for job, why in settled:
            if why is not None:
                told.append((job, why))
                continue
            queued.append(job)
            if job.executor not in no_backend:
                no_backend[job.executor] = self._scheduler.no_backend_notice(job.executor)
            try:
                answers = self._answers(job, no_backend[job.executor], burst)
                self._scheduler.submit(job, dispatch=False)
            except Exception:
                _log_not_queued(job)
                continue
            told.append((job, answers))
        for job, answered in told:
            if isinstance(answered, Exception):
                await answering.refused(job, answered)
                continue
            for answer in answered:
                await answering.announce(answer)

    def _admit(self, job: Job) -> None:
        """The limits and moderation say yes, or raise InvalidRequest."""
        job.cost_units = job_cost_units(job)  # stored with it: the queue is rebuilt without payloads
        self._admission.admit(job)
        # Until it is told its estimate, the estimates of the others count it (estimates.py).
        self._scheduler.estimates.committing.add(job)

    def _drop(self, job: Job) -> None:
        """An admitted request that was not committed (or not accepted after all)."""
        self._admission.release(job.object_id)
        self._scheduler.estimates.committing.discard(job)

    async def _queue_committed(self, job: Job, announce: Announce, *, dispatch: bool = True) -> dict[str, Any]:
        """A committed request: its `queued` told (with the notices that follow it), then it
        joins its line (and is dispatched, unless the caller does that for a burst)."""
        answers = self._answers(job, self._scheduler.no_backend_notice(job.executor))
        # `queued` goes out before the job can be dispatched, so it always precedes `generating`.
        for answer in answers:
            await announce(answer)
        self._scheduler.submit(job, dispatch=dispatch)
        return answers[0]

    def _answers(
        self, job: Job, no_backend_notice: str | None, burst: BurstReading | None = None
    ) -> list[dict[str, Any]]:
        """A committed request's estimate (set on it), and what tells its client: `queued`,
        then an `unknown_field` notice when its payload has keys the backend does not know,
        and a `no_backend` notice when no backend of its type is in service. `burst`: the
        backends as read for the requests answered in passes with it."""
        job.eta_s = self._scheduler.estimates.for_new(job, burst)
        job.eta_told_at = time.monotonic()
        job.eta_due = job.eta_told_at + job.eta_s if job.eta_s is not None else None
        answers = [short_response(job, "queued", job.eta_s)]
        if job.unknown_fields is not None:
            answers.append(
                info_message(
                    "unknown_field",
                    job.unknown_fields.sentence(),
                    object_id=job.object_id,
                    unknown_fields=job.unknown_fields.hints,
                )
            )
        if no_backend_notice:
            answers.append(info_message("no_backend", no_backend_notice, object_id=job.object_id))
        return answers

    async def _answer_repeat(self, original: Job, repeat: Job, announce: Announce) -> dict[str, Any]:
        """A request repeating an idempotency key: the original's current state (its final answer
        if it has one) instead of a new request."""
        log.info(
            "%s: a repeat with the same request_id from %s was not queued again", original.object_id, original.service
        )
        if not original.status.is_final:
            answer = short_response(original, original.status.value, None)
            await announce(answer)
            return answer
        answer = final_response(original)
        if repeat.channel == "ws" and repeat.origin is not None:
            # Through delivery, so the final is not also sent from the backlog at the same time.
            await self._hub.answer_repeat(original, repeat.origin)
        else:
            await announce(answer)
        return answer


def _log_not_queued(job: Job) -> None:
    # Committed, so it runs at the next start even so; the rest of the burst goes on, as it
    # would with a task per request.
    log.exception("%s was committed but could not be queued", job.object_id)


class _QueuedLines:
    """The `queued` log lines of one pass of the event loop, written at its end: one line per
    service and channel, however many connections its requests came on. A log record costs
    ~20 us (made, formatted, written), and bots send one request at a time: a group commit
    wakes the accepts of tens of connections in one pass, and each logged a line of its own."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []

    def add(self, jobs: list[Job]) -> None:
        if not jobs or not log.isEnabledFor(logging.INFO):  # LOGGING_LEVEL=WARNING: no lines to make
            return
        if not self._jobs:
            asyncio.get_running_loop().call_soon(self._write)
        self._jobs.extend(jobs)

    def _write(self) -> None:
        jobs, self._jobs = self._jobs, []
        together: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            origin = "private ws" if job.channel == "http" and job.origin is not None else job.channel
            together.setdefault((job.service, origin), []).append(job)
        for (service, origin), group in together.items():
            if len(group) == 1:
                log.info("%s queued: %s from %s (%s)", group[0].object_id, _what(group[0]), service, origin)
            else:
                what = ", ".join(f"{job.object_id} {_what(job)}" for job in group)
                log.info("%d queued from %s (%s): %s", len(group), service, origin, what)


def _what(job: Job) -> str:
    return f"{job.executor.value} {job.gen_type.value}{' (premium)' if job.premium else ''}"
