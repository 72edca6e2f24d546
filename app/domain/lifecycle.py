"""The scheduler's one record of each request it holds, and the only place its phase changes.

A request the scheduler holds is in exactly one phase:

    QUEUED ──start──> RUNNING ──wait_retry──> RETRY_WAIT ──back_in_line──> QUEUED
       │                 │                        │
       └──────── begin_finish (result, error, cancel, expiry) ──────> FINISHING ──> DONE

Every transition checks its from-phase, so two paths that race for one request (a cancel
arriving while the backend answers, an expiry while a retry waits) cannot both act: the
second finds the phase changed and backs off. The record also owns the request's backend
slot while it runs and its timers, so nothing else keeps a copy that could drift (a cancel
never finds a request through a backend slot another job has taken over since).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.domain.jobs import Job

if TYPE_CHECKING:
    from app.engine.pool import BackendSlot


class Phase(str, enum.Enum):
    QUEUED = "queued"  # in its executor's WeightedQueue
    RUNNING = "running"  # holds a backend slot; its task claims it and calls the backend
    RETRY_WAIT = "retry_wait"  # an attempt failed; a timer puts it back at the head of its line
    FINISHING = "finishing"  # its final status is being stored and delivered
    DONE = "done"  # final status committed and handed to delivery; forgotten


class WrongPhase(RuntimeError):
    """A transition was asked of a request in a phase it cannot leave that way (a bug)."""


class CancelOutcome(str, enum.Enum):
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"  # no queued or running request of this service has that id
    FINISHING = "finishing"  # too late: its final answer is being stored and sent


@dataclass(eq=False, slots=True)
class TrackedRequest:
    job: Job
    phase: Phase = Phase.QUEUED
    slot: BackendSlot | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    retry_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    # When it gives up waiting (the scheduler's ExpiryLine holds the same deadline); None
    # once it cannot expire any more.
    expires_at: float | None = field(default=None, repr=False)
    cancelled: bool = False
    # Backends whose failure of this request is not charged to them yet: an answered 5xx may
    # be the request's fault (an image the backend cannot decode). Charged if the request
    # then succeeds elsewhere; forgiven if a second backend fails it too.
    suspects: list[BackendSlot] = field(default_factory=list, repr=False)
    # When its backend answered (time.monotonic): how long its image then took to reach its
    # client is learned for the estimates (ExecutorPool.note_finishing).
    answered_at: float | None = field(default=None, repr=False)

    @property
    def object_id(self) -> str:
        return self.job.object_id

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise WrongPhase(f"{self.object_id} is {self.phase.value}, not {'/'.join(p.value for p in phases)}")

    def start(self, slot: BackendSlot, task: asyncio.Task[None]) -> None:
        self._require(Phase.QUEUED)
        self.phase, self.slot, self.task = Phase.RUNNING, slot, task

    def leave_slot(self) -> None:
        """The backend call is over (whatever the phase now): the slot is no longer its."""
        self.slot, self.task = None, None

    def wait_retry(self) -> None:
        self._require(Phase.RUNNING)
        self.phase = Phase.RETRY_WAIT

    def set_retry_timer(self, timer: asyncio.TimerHandle) -> None:
        self._require(Phase.RETRY_WAIT)
        self.retry_timer = timer

    def back_in_line(self) -> None:
        self._require(Phase.RETRY_WAIT)
        self.phase, self.retry_timer = Phase.QUEUED, None

    def begin_finish(self, *, cancelled: bool = False) -> bool:
        """Enter FINISHING from any earlier phase. Returns False (and changes nothing) when
        another path already finishes it. Its timers are cancelled."""
        if self.phase in (Phase.FINISHING, Phase.DONE):
            return False
        self.phase, self.cancelled = Phase.FINISHING, cancelled
        self.cancel_timers()
        return True

    def cancel_timers(self) -> None:
        """Its retry timer will not fire, nor will it expire (at finish, and at shutdown)."""
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        self.retry_timer = self.expires_at = None

    def done(self) -> None:
        self._require(Phase.FINISHING)
        self.phase = Phase.DONE
