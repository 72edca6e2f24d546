"""The waiting line of one executor type: general and premium requests, weighted."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator

from app.domain.jobs import Job


class WeightedQueue:
    """Two FIFO classes served in the ratio `general_weight : premium_weight`.

    While both classes wait, of every general+premium picks, `general_weight` take the oldest
    general job and `premium_weight` the oldest premium one, spread out (smooth weighted
    round-robin: with 1:3 the order is P P G P, repeating). A class that is empty simply does
    not take part, and builds no credit meanwhile: the other class is served without gaps,
    and a class that comes back does not get a burst.

    At start-up the stored backlog is read back a page at a time while new requests already
    arrive (app/engine/backlog.py). Until a class's backlog is all read, its new arrivals
    wait behind it: a page read later goes in before them (push_backlog), and they are not
    taken while older requests of their class are still unread.
    """

    def __init__(self, general_weight: int, premium_weight: int) -> None:
        self._weights = {False: general_weight, True: premium_weight}
        self._current = {False: 0, True: 0}
        self._jobs: dict[bool, deque[Job]] = {False: deque(), True: deque()}
        # Sum of the waiting jobs' cost per class, kept as they come and go (ETAs read it per
        # request).
        self._units = {False: 0.0, True: 0.0}
        # Per class: stored requests not read back yet, and the arrivals queued meanwhile (by
        # id(job), at the tail of the line) that must not pass them.
        self._unread = {False: 0, True: 0}
        self._arrived_early: dict[bool, set[int]] = {False: set(), True: set()}

    def __len__(self) -> int:
        return len(self._jobs[False]) + len(self._jobs[True])

    def __repr__(self) -> str:
        return f"<WeightedQueue general={self.waiting(False)} premium={self.waiting(True)}>"

    def waiting(self, premium: bool) -> int:
        """Requests of a class in line, those of the backlog not read back yet included."""
        return len(self._jobs[premium]) + self._unread[premium]

    def push(self, job: Job) -> None:
        self._jobs[job.premium].append(job)
        self._units[job.premium] += job.cost_units
        if self._unread[job.premium]:
            self._arrived_early[job.premium].add(id(job))

    def set_unread(self, premium: bool, count: int) -> None:
        """How many stored requests of a class are still to be read back (push_backlog)."""
        self._unread[premium] = count
        if not count:
            self._arrived_early[premium].clear()  # nothing older is left to wait for

    def push_backlog(self, job: Job) -> None:
        """Queue a stored request read back at start-up: after those read before it, ahead
        of every request that arrived since the start."""
        line = self._jobs[job.premium]
        line.insert(len(line) - len(self._arrived_early[job.premium]), job)
        self._units[job.premium] += job.cost_units

    def push_front(self, job: Job) -> None:
        """Put a job back at the head of its class (it keeps its place in line)."""
        self._jobs[job.premium].appendleft(job)
        self._units[job.premium] += job.cost_units

    def remove(self, job: Job) -> bool:
        try:
            self._jobs[job.premium].remove(job)
        except ValueError:
            return False
        self._units[job.premium] -= job.cost_units
        self._arrived_early[job.premium].discard(id(job))
        return True

    def pop(self, accept: Callable[[Job], bool] | None = None, *, largest_within: int = 0) -> Job | None:
        """Take the next job, or None when nothing (acceptable) waits.

        `accept` lets the caller pass over jobs that cannot run now (say, ones that should
        not go back to the backend that just failed them); the first acceptable job of the
        class whose turn it is is taken, so a passed-over job keeps its place.

        `largest_within` (placement by the dispatcher): of the first that many jobs of a class,
        the largest acceptable one is taken, and `accept` sees them largest first. Big jobs
        then start early, on the fast backends, and small ones fill in at the end of a burst.
        The reordering is bounded: a job that later jobs of its class have passed
        `largest_within` times is offered first, whatever its size.
        """
        heads = {premium: self._first(premium, accept, largest_within) for premium in (True, False)}
        candidates = [premium for premium in (True, False) if heads[premium] is not None]
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            total = 0
            for premium in candidates:
                self._current[premium] += self._weights[premium]
                total += self._weights[premium]
            # Ties go to premium (candidates lists it first).
            chosen = max(candidates, key=lambda premium: self._current[premium])
            self._current[chosen] -= total
        job = heads[chosen]
        assert job is not None  # only classes with a head are candidates
        line = self._jobs[chosen]
        if line[0] is job:
            line.popleft()
        else:
            for ahead in line:
                if ahead is job:
                    break
                ahead.passed_over += 1
            line.remove(job)
        self._units[job.premium] -= job.cost_units
        return job

    def _takeable(self, premium: bool) -> int:
        """How many of a class's jobs, from the head, may be taken now (not those that arrived
        while older ones of their class are still unread)."""
        return len(self._jobs[premium]) - len(self._arrived_early[premium])

    def _first(self, premium: bool, accept: Callable[[Job], bool] | None, largest_within: int) -> Job | None:
        line, takeable = self._jobs[premium], self._takeable(premium)
        skipped = 0
        if largest_within:
            window = list(itertools.islice(line, min(takeable, largest_within)))
            skipped = len(window)
            if window and window[0].passed_over >= largest_within:
                head = window.pop(0)  # passed over often enough: offered first, and once
                if accept is None or accept(head):
                    return head
            for job in sorted(window, key=lambda job: job.cost_units, reverse=True):
                if accept is None or accept(job):
                    return job
        for job in itertools.islice(line, skipped, takeable):
            if accept is None or accept(job):
                return job
        return None

    def heads(self, depth: int) -> list[Job]:
        """The first `depth` takeable jobs of each class: those `pop(largest_within=depth)`
        chooses among."""
        return [
            job
            for premium in (True, False)
            for job in itertools.islice(self._jobs[premium], min(self._takeable(premium), depth))
        ]

    def __iter__(self) -> Iterator[Job]:
        yield from self._jobs[True]
        yield from self._jobs[False]

    def in_dispatch_order(self, limit: int) -> list[Job]:
        """The first `limit` waiting jobs in the order `pop` would take them (for estimates;
        changes nothing)."""
        current = dict(self._current)
        taken = {False: 0, True: 0}
        takeable = {premium: self._takeable(premium) for premium in (True, False)}
        order: list[Job] = []
        while len(order) < limit:
            candidates = [premium for premium in (True, False) if taken[premium] < takeable[premium]]
            if not candidates:
                break
            chosen = candidates[0]
            if len(candidates) == 2:
                total = 0
                for premium in candidates:
                    current[premium] += self._weights[premium]
                    total += self._weights[premium]
                chosen = max(candidates, key=lambda premium: current[premium])
                current[chosen] -= total
            order.append(self._jobs[chosen][taken[chosen]])
            taken[chosen] += 1
        return order

    @property
    def waiting_units(self) -> float:
        return self._units[False] + self._units[True]

    def mean_units(self, premium: bool) -> float | None:
        """The mean cost of the waiting jobs of a class (None when none waits)."""
        count = len(self._jobs[premium])
        return self._units[premium] / count if count else None

    def picks_before_new(self, premium: bool) -> int:
        """How many jobs would be taken before a job of this class pushed now."""
        same, other, _ = self.picks_ahead(premium)
        return same + other

    def larger_waiting(self, premium: bool, cost_units: float) -> list[float]:
        """The costs of the waiting jobs of a class at least `cost_units` large: those taken
        before a job of that cost where the dispatcher takes the largest first."""
        return [job.cost_units for job in self._jobs[premium] if job.cost_units >= cost_units]

    def picks_ahead(self, premium: bool, same: int | None = None) -> tuple[int, int, int]:
        """For a job of this class pushed now: (jobs of its class taken before it, jobs of the
        other class taken before it, further jobs of the other class that could still be
        taken before it if they arrived now: the room the ratio leaves them). `same` says
        how many of its class go first, when not all of them (largest first)."""
        same = self.waiting(premium) if same is None else same
        other = self.waiting(not premium)
        own_weight, other_weight = self._weights[premium], self._weights[not premium]
        if own_weight == 0:
            return same, other, 0
        other_allowed = math.ceil((same + 1) * other_weight / own_weight)
        return same, min(other, other_allowed), max(0, other_allowed - other)
