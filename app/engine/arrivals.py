"""What the estimates know of the requests still to come, per class (general, premium): how
often they arrive, how large they are, and how many of those that arrive while a request of
the other class waits get to pass it.

A request that waits is passed by requests of the other class that arrive after it, as far as
the premium ratio leaves them room (WeightedQueue.picks_ahead). Not every arrival in that time
passes: one that comes shortly before the waiting request starts finds the backends taken, and
one that waits for a fast busy backend leaves the free slow one to the request it would have
passed (app/engine/placement.py). How many do is measured here rather than modelled: each
request records, when it starts, how many of the other class arrived while it waited (as far
as the ratio left room) and how many of those started before it. Replaying the estimate trace
(bench/estimates.py) with every arrival counted as passing, general requests were told ~1.8x
the passes they saw (1.06 per request against 0.60).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from app.domain.jobs import Job

# Arrival rates are counted over this window.
ARRIVAL_WINDOW_S = 60.0
# Weight of each new request in the moving average of its class's arriving sizes.
ARRIVING_UNITS_WEIGHT = 0.05
# Each started request's count of arrivals and passes weighs this much more than the one
# before it (the older counts fade by this factor per request): about the last 30 requests
# decide the share.
PASSING_MEMORY = 0.97
# Below this many arrivals counted (after fading), every arrival is assumed to pass: the
# cautious side until there is something to go on.
PASSING_MIN_ARRIVALS = 5.0


@dataclass(frozen=True, slots=True)
class ArrivalMark:
    """Where a request stands among the arrivals, kept on its Job until it starts."""

    number: int  # its place among its class's arrivals (1, 2, ...)
    other_arrived: int  # how many of the other class had arrived before it
    room: int  # how many more of the other class the ratio would let pass it, at its arrival


class Arrivals:
    def __init__(self) -> None:
        # When requests of each class arrived lately (premium -> times).
        self._times: dict[bool, collections.deque[float]] = {False: collections.deque(), True: collections.deque()}
        # A moving average of each class's arriving sizes: the size of those that will pass.
        self._units: dict[bool, float | None] = {False: None, True: None}
        self._count = {False: 0, True: 0}
        # The highest arrival number of each class that has started. Each class starts nearly
        # in arrival order, so every request of the other class numbered after a waiting
        # request's mark and up to this one has passed it.
        self._started_number = {False: 0, True: 0}
        # Per class of the waiting request, faded sums: the other class's arrivals it saw
        # while waiting, and those of them that started before it.
        self._seen = {False: 0.0, True: 0.0}
        self._passed = {False: 0.0, True: 0.0}

    def arrived(self, job: Job, room: int) -> None:
        """`job` was queued just now; `room` is how many more of the other class the ratio
        lets pass it (WeightedQueue.picks_ahead, before the job was queued)."""
        premium = job.premium
        mean = self._units[premium]
        self._units[premium] = (
            job.cost_units if mean is None else mean + ARRIVING_UNITS_WEIGHT * (job.cost_units - mean)
        )
        times = self._times[premium]
        now = time.monotonic()
        times.append(now)
        while times and times[0] < now - ARRIVAL_WINDOW_S:
            times.popleft()
        self._count[premium] += 1
        job.arrival_mark = ArrivalMark(self._count[premium], self._count[not premium], room)

    def started(self, job: Job) -> None:
        """`job` was dispatched: count the other class's arrivals that passed it meanwhile.
        Only a request's first start counts (a retry's wait is not a queue wait), and only
        requests that arrived during this run (a backlog read back at start-up has no mark)."""
        mark, job.arrival_mark = job.arrival_mark, None
        if mark is None:
            return
        premium, other = job.premium, not job.premium
        self._started_number[premium] = max(self._started_number[premium], mark.number)
        seen = min(mark.room, self._count[other] - mark.other_arrived)
        if seen <= 0:
            return
        passed = min(seen, max(0, self._started_number[other] - mark.other_arrived))
        self._seen[premium] = self._seen[premium] * PASSING_MEMORY + seen
        self._passed[premium] = self._passed[premium] * PASSING_MEMORY + passed

    def passing_share(self, premium: bool) -> float:
        """The share of the other class's arrivals (within the ratio's room) that pass a
        waiting request of this class, as measured lately; 1 until enough were seen."""
        seen = self._seen[premium]
        return self._passed[premium] / seen if seen >= PASSING_MIN_ARRIVALS else 1.0

    def rate(self, premium: bool) -> float:
        """Requests of this class queued per second, over the last ARRIVAL_WINDOW_S."""
        times = self._times[premium]
        if len(times) < 2:
            return 0.0
        span = max(time.monotonic() - times[0], 1.0)
        return len(times) / span

    def mean_units(self, premium: bool) -> float | None:
        """The mean cost of this class's recent arrivals (None before the first)."""
        return self._units[premium]

    def latest(self) -> float | None:
        """When the last request of either class arrived (time.monotonic), if any did."""
        return max((times[-1] for times in self._times.values() if times), default=None)
