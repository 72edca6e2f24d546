"""The dispatcher run forward for an estimate: a copy of the line, a virtual clock, and the
dispatcher's own decision (app/engine/placement.py, place_next) at each moment a backend
frees, each job taking its cost over its backend's learned speed.

An estimate that only placed the waiting jobs one by one in dispatch order (each where it is
done first) disagreed with the dispatcher for 30 of 40 jobs even with exact speeds and no
arrivals: the dispatcher lets the class whose turn it is start a job further back in its
line when the job ahead of it (of the other class) waits for a busy faster backend. Running
the decision itself leaves nothing to disagree about (tests/test_pool_and_costs.py checks
that every job ends when its estimate said).

Unknowable from here, and left to the estimate (ExecutorPool.eta_for_new): the requests that
will arrive and pass, and how far a job's time differs from its cost over the learned speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.domain.jobs import Job
from app.engine.placement import OVERDUE_S, BackendsNow, place_next
from app.engine.queues import WeightedQueue

if TYPE_CHECKING:
    from app.engine.pool import BackendSlot


@dataclass(eq=False, slots=True)
class StandIn:
    """A waiting job in a forecast: what placement reads of it, on a copy of its own."""

    job: Job | None  # None for the request being estimated (not queued yet)
    premium: bool
    cost_units: float
    passed_over: int = 0
    avoid_backends: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, job: Job) -> StandIn:
        return cls(job, job.premium, job.cost_units, job.passed_over, job.avoid_backends)


@dataclass(frozen=True, slots=True)
class Start:
    """One job started in a forecast: on which backend, and when it starts and is done
    (seconds from now)."""

    stand_in: StandIn
    backend: int
    start_s: float
    done_s: float


class Forecast:
    """The first `per_class` waiting jobs of each class of `line`, dispatched on a virtual
    clock over the backends `serving` (in service now)."""

    def __init__(self, line: WeightedQueue[Job], serving: list[BackendSlot], per_class: int) -> None:
        self.line = line.fork(per_class, StandIn.of)
        now = BackendsNow.of(serving)
        self.names, self.speeds = now.names, now.speeds
        # When each backend is free, in seconds from now on the forecast's clock.
        self.free_at = now.free_s
        self.clock = 0.0

    def add(self, stand_in: StandIn) -> None:
        """Queue one more (the request being estimated) at the tail of its class."""
        self.line.push(stand_in)

    def run(self) -> Iterator[Start]:
        """The jobs of the copied line in the order the dispatcher starts them."""
        free_at, clock = self.free_at, self.clock
        while len(self.line):
            idle = [at <= clock for at in free_at]
            placed = None
            if any(idle):
                free_s = [
                    0.0 if is_idle else max(OVERDUE_S, at - clock) for at, is_idle in zip(free_at, idle, strict=True)
                ]
                placed = place_next(self.line, BackendsNow(self.names, self.speeds, free_s, idle))
            if placed is None:  # every idle backend is better left for a job that waits for it
                later = [at for at in free_at if at > clock]
                if not later:
                    return
                clock = self.clock = min(later)
                continue
            stand_in, index = placed
            done_s = clock + stand_in.cost_units / self.speeds[index]
            free_at[index] = done_s
            yield Start(stand_in, index, clock, done_s)
