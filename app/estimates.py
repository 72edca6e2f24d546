"""How long until a result is ready (`avg_time`), from recent generation durations."""

from __future__ import annotations

import statistics
from collections import deque

# Recent durations kept per executor type; enough to follow a change of model or GPU within
# a few minutes, few enough that one slow job does not dominate.
RECENT_DURATIONS = 20
# Before anything has finished: a typical 512x512, 30-50 step generation on a consumer GPU.
INITIAL_GUESS_S = 10.0


class DurationEstimator:
    """Running estimate of one executor type's generation time, in seconds."""

    def __init__(self, initial_guess_s: float = INITIAL_GUESS_S) -> None:
        self._recent: deque[float] = deque(maxlen=RECENT_DURATIONS)
        self._initial_guess_s = initial_guess_s

    def record(self, duration_s: float) -> None:
        self._recent.append(duration_s)

    @property
    def typical_s(self) -> float:
        # The median shrugs off one job that hung until its timeout.
        return statistics.median(self._recent) if self._recent else self._initial_guess_s

    def wait_s(self, jobs_ahead: int, running_elapsed_s: list[float], backends: int) -> float:
        """Seconds until a job with `jobs_ahead` dispatches before it is done, given how long
        each running job has been going and how many backends share the queue."""
        typical = self.typical_s
        if backends <= 0:
            return typical * (jobs_ahead + 1)
        remaining_running = sum(max(0.0, typical - elapsed) for elapsed in running_elapsed_s)
        free_now = backends - len(running_elapsed_s)
        if jobs_ahead < free_now:
            return typical
        return (remaining_running + jobs_ahead * typical) / backends + typical
