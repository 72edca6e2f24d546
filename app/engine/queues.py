"""The waiting line of one executor type: general and premium requests, weighted."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    """What the line needs of what waits in it: a Job, or the stand-in for one in a forecast
    (app/engine/forecast.py)."""

    premium: bool
    cost_units: float
    passed_over: int  # times a later one of its class was taken before it


T = TypeVar("T", bound=Waiting)
U = TypeVar("U", bound=Waiting)


class WeightedQueue(Generic[T]):
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
        self._period_picks: dict[tuple[bool, int], int] = {}  # _other_picks_in_period's answers
        self._jobs: dict[bool, deque[T]] = {False: deque(), True: deque()}
        # Sum of the waiting jobs' cost per class, kept as they come and go (ETAs read it per
        # request).
        self._units = {False: 0.0, True: 0.0}
        # Per class: stored requests not read back yet, and the arrivals queued meanwhile (by
        # id(job), at the tail of the line) that must not pass them.
        self._unread = {False: 0, True: 0}
        self._arrived_early: dict[bool, set[int]] = {False: set(), True: set()}
        # The most jobs waiting at once since the line was last empty (placement's
        # largest-first tail is for the end of a backlog, not a short line now and then).
        self.backlog_peak = 0

    def __len__(self) -> int:
        return len(self._jobs[False]) + len(self._jobs[True])

    def __repr__(self) -> str:
        return f"<WeightedQueue general={self.waiting(False)} premium={self.waiting(True)}>"

    def fork(self, per_class: int, stand_in: Callable[[T], U]) -> WeightedQueue[U]:
        """A line to try things on (a forecast): the same ratio and turn, with `stand_in`
        of each of the first `per_class` takeable jobs of each class, in their order. What is
        done to it leaves this line and its jobs alone."""
        fork: WeightedQueue[U] = WeightedQueue(self._weights[False], self._weights[True])
        fork._current = dict(self._current)
        for premium, line in self._jobs.items():
            for job in itertools.islice(line, min(per_class, self.takeable(premium))):
                fork.push(stand_in(job))
        return fork

    def waiting(self, premium: bool) -> int:
        """Requests of a class in line, those of the backlog not read back yet included."""
        return len(self._jobs[premium]) + self._unread[premium]

    def push(self, job: T) -> None:
        self._jobs[job.premium].append(job)
        self._added(job)
        if self._unread[job.premium]:
            self._arrived_early[job.premium].add(id(job))

    def set_unread(self, premium: bool, count: int) -> None:
        """How many stored requests of a class are still to be read back (push_backlog)."""
        self._unread[premium] = count
        if not count:
            self._arrived_early[premium].clear()  # nothing older is left to wait for

    def push_backlog(self, job: T) -> None:
        """Queue a stored request read back at start-up: after those read before it, ahead
        of every request that arrived since the start."""
        line = self._jobs[job.premium]
        line.insert(len(line) - len(self._arrived_early[job.premium]), job)
        self._added(job)

    def push_front(self, job: T) -> None:
        """Put a job back at the head of its class (it keeps its place in line)."""
        self._jobs[job.premium].appendleft(job)
        self._added(job)

    def remove(self, job: T) -> bool:
        try:
            self._jobs[job.premium].remove(job)
        except ValueError:
            return False
        self._gone(job)
        return True

    def _added(self, job: T) -> None:
        self._units[job.premium] += job.cost_units
        self.backlog_peak = max(self.backlog_peak, len(self))

    def _gone(self, job: T) -> None:
        self._units[job.premium] -= job.cost_units
        self._arrived_early[job.premium].discard(id(job))
        if not (self._jobs[False] or self._jobs[True]):
            self.backlog_peak = 0

    def pop(self, accept: Callable[[T], bool] | None = None, *, largest_within: int = 0) -> T | None:
        """Take the first job that `accept` takes (all, by default): of the class whose turn it
        is, else of the other class (out of turn); None when none does. A job passed over
        keeps its place. (The dispatcher places jobs itself: app/engine/placement.py.)"""
        for turn, premium in enumerate(self.turn_order()):
            for job in self.class_order(premium, largest_within):
                if accept is None or accept(job):
                    self.take(job, in_turn=turn == 0)
                    return job
        return None

    def turn_order(self) -> list[bool]:
        """The classes with jobs to take (True: premium), the one whose turn it is first."""
        candidates = [premium for premium in (True, False) if self.takeable(premium)]
        if len(candidates) == 2 and not self._pick(dict(self._current)):
            candidates.reverse()
        return candidates

    def _pick(self, current: dict[bool, int], chosen: bool | None = None) -> bool:
        """One pick of the smooth weighted round-robin while both classes wait, on `current`
        (the queue's credits, or a copy to look ahead): each class gains its weight, the
        chosen one (by default the one with the most credit, ties to premium) pays the total.
        Returns the class picked (True: premium)."""
        current[True] += self._weights[True]
        current[False] += self._weights[False]
        if chosen is None:
            chosen = current[True] >= current[False]
        current[chosen] -= self._weights[True] + self._weights[False]
        return chosen

    def take(self, job: T, *, in_turn: bool = True) -> None:
        """Take `job` off the line. Taken in its class's turn, it is a pick of its class for
        the ratio whenever the other class has jobs too. Taken out of turn (every job of the
        class whose turn it is waits for a busy backend), the turns stay as they were, as if
        that class had nothing waiting: charging such picks would make a class owe turns and
        then take several in a row, past what the ratio allows the other class."""
        if in_turn and self.takeable(not job.premium) > 0:
            self._pick(self._current, job.premium)
            self._period_picks.clear()
        line = self._jobs[job.premium]
        if line[0] is job:
            line.popleft()
        else:
            for ahead in line:
                if ahead is job:
                    break
                ahead.passed_over += 1
            line.remove(job)
        self._gone(job)

    def takeable(self, premium: bool) -> int:
        """How many of a class's jobs, from the head, may be taken now (not those that arrived
        while older ones of their class are still unread)."""
        return len(self._jobs[premium]) - len(self._arrived_early[premium])

    def class_order(self, premium: bool, largest_within: int = 0) -> Iterator[T]:
        """A class's takeable jobs in the order they are offered: arrival order, except that
        with `largest_within` the first that many go largest first (after the head, if later
        jobs have passed it over that often already: the reordering is bounded)."""
        line, takeable = self._jobs[premium], self.takeable(premium)
        skipped = 0
        if largest_within:
            window = list(itertools.islice(line, min(takeable, largest_within)))
            skipped = len(window)
            if window and window[0].passed_over >= largest_within:
                yield window.pop(0)
            yield from sorted(window, key=lambda job: job.cost_units, reverse=True)
        yield from itertools.islice(line, skipped, takeable)

    def __iter__(self) -> Iterator[T]:
        yield from self._jobs[True]
        yield from self._jobs[False]

    def dispatch_order(self, *, largest_within: int = 0) -> Iterator[T]:
        """The waiting jobs in the order the dispatcher offers them backends: the ratio decides
        whose turn it is (from the credits as they stand, as if each job offered were taken),
        each class in its own order (class_order). Changes nothing."""
        current = dict(self._current)
        lines = {premium: self.class_order(premium, largest_within) for premium in (True, False)}
        heads = {premium: next(lines[premium], None) for premium in (True, False)}
        while True:
            if heads[True] is None:
                chosen = False
            elif heads[False] is None:
                chosen = True
            else:
                chosen = self._pick(current)
            job = heads[chosen]
            if job is None:
                return
            yield job
            heads[chosen] = next(lines[chosen], None)

    def in_dispatch_order(self, limit: int) -> list[T]:
        """The first `limit` waiting jobs in dispatch order (for estimates)."""
        return list(itertools.islice(self.dispatch_order(), limit))

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

    def picks_ahead(self, premium: bool, same: int | None = None) -> tuple[int, int, int]:
        """For a job of this class pushed now: (jobs of its class taken before it, jobs of the
        other class taken before it, further jobs of the other class that could still be
        taken before it if they arrived now: the room the ratio leaves them). `same` says
        how many of its class go first, when not all of them (for a job already in line: those
        ahead of it).

        Counted from the round-robin's current credits, exactly as `pop` will go on: whether
        the next pick is premium or general is often the difference of a whole job."""
        same = self.waiting(premium) if same is None else same
        other = self.waiting(not premium)
        if self._weights[premium] == 0:
            return same, other, 0  # its class is only served when the other is empty
        other_allowed = self._other_picks_before(premium, same + 1)
        return same, min(other, other_allowed), max(0, other_allowed - other)

    def _other_picks_before(self, premium: bool, nth: int) -> int:
        """How many picks of the other class come before the `nth` pick of this class while
        both classes have jobs. The credits return to where they started after every
        general_weight + premium_weight picks (each class is picked its weight's number of
        times), so one such period is replayed and the rest counted whole."""
        own_weight, other_weight = self._weights[premium], self._weights[not premium]
        periods, nth_in_period = divmod(nth - 1, own_weight)
        return periods * other_weight + self._other_picks_in_period(premium, nth_in_period)

    def _other_picks_in_period(self, premium: bool, own_picks_before: int) -> int:
        """Picks of the other class before this class's (`own_picks_before` + 1)th, from the
        credits as they stand. Every estimate asks; the answer only changes with the credits,
        so it is kept until they do (take)."""
        key = (premium, own_picks_before)
        known = self._period_picks.get(key)
        if known is not None:
            return known
        current = dict(self._current)
        own_picks = other_picks = 0
        while own_picks <= own_picks_before:
            if self._pick(current) == premium:
                own_picks += 1
            else:
                other_picks += 1
        self._period_picks[key] = other_picks
        return other_picks
