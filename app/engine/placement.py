"""Which waiting job goes to which free backend, now: the dispatcher's one decision, and the
rule its estimates run forward.

Each job goes to the backend where it will be done first (`where_done_first`): of the
backends that can start it soonest, the fastest, unless a busy one is expected to finish it
sooner by more than HOLD_MARGIN. The dispatcher decides in two steps:
1. It walks the line in dispatch order (WeightedQueue.dispatch_order: the premium ratio's
   turns, each class in arrival order). A job whose best backend is busy is counted as that
   backend's next job, so the jobs after it see it taken; a job whose best backend is free
   could start now. Large jobs so wait a moment for fast GPUs while the small jobs behind
   them take the slow ones.
2. Of the jobs that could start, the first of the class whose turn it is starts (a pick of
   its class for the ratio); if that class has none, the first of the other class does,
   without using up a turn (WeightedQueue.take), so the ratio holds as dispatched.

The estimates run this same decision (`place_next`) forward on a copy of the line
(app/engine/forecast.py), so what a client is told is what the dispatcher will do unless
something changes.

Bounds:
- only the first PLACEMENT_WINDOW jobs of each class may wait for a busy backend; the next
  one takes a free one (a free backend idles only while every job in the window is expected
  done sooner elsewhere);
- a job is passed over by later jobs of its class at most PASSED_OVER_LIMIT times, then takes
  the first free backend;
- near the end of a backlog that is running out (LARGEST_FIRST_TAIL, LARGEST_FIRST_BACKLOG,
  ExecutorPool.draining), the first PLACEMENT_WINDOW jobs of a class are walked largest
  first, so the last backend to finish is not a slow one still busy with a big job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from app.domain.jobs import Job
from app.engine.queues import Waiting, WeightedQueue

if TYPE_CHECKING:
    from app.engine.pool import BackendSlot, ExecutorPool

# Chosen by replaying 20 seeded bursts of 60 mixed jobs on speeds 1, 1, 2, 4 with exact speeds
# (makespan / ideal, median and worst): in arrival order with earliest finish, 1.029 and 1.51;
# largest first over the whole backlog with a window of 4 / 8 / 12, 1.017 / 1.011 / 1.003 and
# 1.065 / 1.04 / 1.13; largest first (window 8) only once at most 1 / 2 / 3 jobs per backend
# wait, 1.023 / 1.011 / 1.007 and 1.054 / 1.03 / 1.022. The tail rule keeps most of the gain
# and leaves the order, and so the estimates, alone while a long line waits.
PLACEMENT_WINDOW = 8
HOLD_MARGIN = 0.1
# A job waiting for a fast backend is passed by the small jobs behind it that take the slow
# ones; past this many passes it takes the first free backend, whatever its size. At 8 (the
# window) that sent the largest job of some bursts to a 1x GPU just before the 4x one freed.
# 100 seeded bursts of 60 on speeds 1, 1, 2, 4 (bench/scheduling_replay.py), makespan / ideal:
# with 8, 6 ended past 1.03x (worst 1.11x), and 7 when they started with the speeds known
# (worst 1.25x); with 10, 16, 20 or no limit, 2 (worst 1.05x) and 1 or 2 (1.09x). The
# replayed estimates' p99 went 0.51 -> 0.53; the premium share and its longest run past a
# general job did not move.
PASSED_OVER_LIMIT = 2 * PLACEMENT_WINDOW
# Largest first applies once no more than this many jobs per backend in service wait...
# 3 rather than 2 since the backlog rule below keeps it out of steady flows: the burst of 60
# replayed offline with speeds learned from scratch (20 seeds, makespan / ideal, median and
# worst) gave 1.015 and 1.076 with 2, 1.006 and 1.034 with 3, 1.008 and 1.030 with 4; the
# estimates' replayed errors did not move (bench/scheduling_replay.py).
LARGEST_FIRST_TAIL = 3
# ...at the end of a backlog: this many jobs per backend in service waited at once since the
# line was last empty. A steady flow's line runs short now and then; reordering it there made
# the estimates told with `queued` less true (replayed trace, bench/scheduling_replay.py, 8
# seeds: p99 0.54 -> 0.51 for all, premium 0.67 -> 0.55; with exact times and no premium
# 0.26 -> 0.13), and its makespan is no goal. The burst of 60 on speeds 1, 1, 2, 4 finished
# in 1.010-1.042x the ideal with it, 1.020-1.042x without (5 runs each).
LARGEST_FIRST_BACKLOG = 4
# A busy backend whose job has run past its expected end is counted as freeing this soon.
OVERDUE_S = 0.001


def where_done_first(free_s: Sequence[float], speeds: Sequence[float], cost_units: float) -> int:
    """The index of the backend a job of this cost goes to, given when each backend is free
    (seconds from now) and its speed: of those free soonest, the fastest, unless another is
    expected to finish it sooner by more than HOLD_MARGIN. (A plain loop: every estimate calls
    this for each job it replays.)"""
    soonest = min(free_s)
    first = best = 0
    first_speed = best_speed = 0.0
    first_done = best_done = math.inf
    for index, free in enumerate(free_s):
        speed = speeds[index]
        done = free + cost_units / speed
        if done < best_done or (done == best_done and speed > best_speed):
            best, best_done, best_speed = index, done, speed
        if free <= soonest and speed > first_speed:
            first, first_done, first_speed = index, done, speed
    return best if best_done < first_done * (1 - HOLD_MARGIN) else first


class Placeable(Waiting, Protocol):
    """What placement needs of a waiting job (a Job, or a forecast's stand-in for one)."""

    avoid_backends: set[str]  # backends that failed it: tried last


P = TypeVar("P", bound=Placeable)


@dataclass(slots=True)
class BackendsNow:
    """The backends in service as one placement decision sees them."""

    names: list[str]
    speeds: list[float]
    free_s: list[float]  # seconds until each is free: 0 when idle, at least OVERDUE_S when busy
    idle: list[bool]

    @classmethod
    def of(cls, in_service: list[BackendSlot]) -> BackendsNow:
        """The backends as they stand now, each busy one free when its job is expected to end."""
        now = time.monotonic()
        return cls(
            names=[slot.name for slot in in_service],
            speeds=[slot.units_per_s for slot in in_service],
            free_s=[
                max(OVERDUE_S, slot.seconds_until_free(now)) if slot.job is not None else 0.0 for slot in in_service
            ],
            idle=[slot.job is None for slot in in_service],
        )


def next_placement(pool: ExecutorPool) -> tuple[Job, BackendSlot] | None:
    """The next job of `pool`'s line and the free backend to run it, taken off the line; None
    when no free backend should take anything now."""
    if not len(pool.queue) or not any(slot.available for slot in pool.slots):
        return None
    in_service = pool.in_service()
    backends = BackendsNow.of(in_service)
    largest_within = PLACEMENT_WINDOW if pool.largest_first(in_service) else 0
    placed = place_next(pool.queue, backends, largest_within)
    if placed is None:
        return None
    job, index = placed
    return job, in_service[index]


def place_next(line: WeightedQueue[P], backends: BackendsNow, largest_within: int = 0) -> tuple[P, int] | None:
    """The dispatcher's decision on `line` (taken off it) and the index of the idle backend
    it goes to; None when no idle backend should take anything now. `backends.free_s` is
    used up (the walk counts waiting jobs on busy backends there). The estimates run this
    same function forward on a copy of the line (app/engine/forecast.py)."""
    turns = line.turn_order()
    if not turns:
        return None
    free_s, speeds, idle = backends.free_s, backends.speeds, backends.idle
    everywhere = list(range(len(speeds)))
    # In dispatch order, each job's best backend: a busy one is counted as that backend's next
    # job (the jobs after it see it taken), an idle one is where it could start. The first
    # job of the class whose turn it is that could start, starts (the walk ends there: the
    # jobs after it change nothing before it); if that class has none, the first of the other
    # class that could start does, out of turn.
    other_class_could_start: tuple[P, int] | None = None
    walked = {False: 0, True: 0}
    # Past the window, a class's first job that can start is the last one of it that matters.
    enough = {premium: min(PLACEMENT_WINDOW + 1, line.takeable(premium)) for premium in (True, False)}
    for job in line.dispatch_order(largest_within=largest_within):
        if walked[False] >= enough[False] and walked[True] >= enough[True]:
            break
        walked[job.premium] += 1
        # A retried job goes to a backend that has not failed it yet, unless every backend in
        # service already has.
        allowed = everywhere
        if job.avoid_backends:
            allowed = [index for index in everywhere if backends.names[index] not in job.avoid_backends] or everywhere
        if not any(idle[index] for index in allowed):
            continue
        if walked[job.premium] <= PLACEMENT_WINDOW and job.passed_over < PASSED_OVER_LIMIT:
            if allowed is everywhere:
                chosen = where_done_first(free_s, speeds, job.cost_units)
            else:
                at = where_done_first([free_s[i] for i in allowed], [speeds[i] for i in allowed], job.cost_units)
                chosen = allowed[at]
        else:
            chosen = max((i for i in allowed if idle[i]), key=lambda index: speeds[index])
        if not idle[chosen]:
            free_s[chosen] += job.cost_units / speeds[chosen]  # it waits for this busy backend
        elif job.premium == turns[0]:
            line.take(job, in_turn=True)
            return job, chosen
        elif other_class_could_start is None:
            other_class_could_start = job, chosen
    if other_class_could_start is None:
        return None
    job, chosen = other_class_could_start
    line.take(job, in_turn=False)
    return job, chosen
