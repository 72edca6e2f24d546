"""Which waiting job goes to which free backend, now: the dispatcher's one decision, and the
rule its estimates replay.

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

The estimates (app/engine/pool.py, _Replay) place the waiting jobs in dispatch order by the
same function, so what a client is told is what the dispatcher will do unless something
changes.

Bounds:
- only the first PLACEMENT_WINDOW jobs of each class may wait for a busy backend; the next
  one takes a free one (a free backend idles only while every job in the window is expected
  done sooner elsewhere);
- a job is passed over by later jobs of its class at most PLACEMENT_WINDOW times, then takes
  the first free backend;
- near the end of a backlog that is running out (LARGEST_FIRST_TAIL, ExecutorPool.draining),
  the first PLACEMENT_WINDOW jobs of a class are walked largest first, so the last backend to
  finish is not a slow one still busy with a big job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.domain.jobs import Job

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
# Largest first applies once no more than this many jobs per backend in service wait.
LARGEST_FIRST_TAIL = 2
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


def next_placement(pool: ExecutorPool) -> tuple[Job, BackendSlot] | None:
    """The next job of `pool`'s line and the free backend to run it, taken off the line; None
    when no free backend should take anything now."""
    if not len(pool.queue) or not any(slot.available for slot in pool.slots):
        return None
    in_service = pool.in_service()
    now = time.monotonic()
    # When each backend in service is free, as this walk counts jobs on the busy ones.
    free_s = [max(OVERDUE_S, slot.seconds_until_free(now)) if slot.job is not None else 0.0 for slot in in_service]
    speeds = [slot.units_per_s for slot in in_service]
    largest_within = PLACEMENT_WINDOW if pool.largest_first(in_service) else 0
    # First, in dispatch order, each job's best backend: a busy one is counted as that
    # backend's next job (the jobs after it see it taken), a free one is where it could start.
    could_start: list[tuple[Job, BackendSlot]] = []
    walked = {False: 0, True: 0}
    # Past the window, a class's first job that can start is the last one of it that matters.
    enough = {premium: min(PLACEMENT_WINDOW + 1, pool.queue.takeable(premium)) for premium in (True, False)}
    for job in pool.queue.dispatch_order(largest_within=largest_within):
        if walked[False] >= enough[False] and walked[True] >= enough[True]:
            break
        walked[job.premium] += 1
        # A retried job goes to a backend that has not failed it yet, unless every backend in
        # service already has.
        allowed = [index for index, slot in enumerate(in_service) if slot.name not in job.avoid_backends]
        allowed = allowed or list(range(len(in_service)))
        if not any(in_service[index].job is None for index in allowed):
            continue
        if walked[job.premium] <= PLACEMENT_WINDOW and job.passed_over < PLACEMENT_WINDOW:
            at = where_done_first([free_s[i] for i in allowed], [speeds[i] for i in allowed], job.cost_units)
            chosen = allowed[at]
        else:
            chosen = max((i for i in allowed if in_service[i].job is None), key=lambda index: speeds[index])
        if in_service[chosen].job is None:
            could_start.append((job, in_service[chosen]))
        else:
            free_s[chosen] += job.cost_units / speeds[chosen]  # it waits for this busy backend
    # Then the class whose turn it is starts its first job that can, else the other class.
    for turn, premium in enumerate(pool.queue.turn_order()):
        for job, slot in could_start:
            if job.premium == premium:
                pool.queue.take(job, in_turn=turn == 0)
                return job, slot
    return None
