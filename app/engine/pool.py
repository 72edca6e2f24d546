"""Backend instances as the scheduler sees them: health, learned speed, the job they run.

Each instance has a watcher task (`watch_health`) for its whole life: it probes an idle
healthy backend every HEALTH_INTERVAL_S, and a down one with a backoff that doubles up to
PROBE_BACKOFF_MAX_S, bringing it back when the probe answers. Jobs take a backend down too:
at once when it is unreachable or times out, else after BREAKER_FAILURES failed jobs in a
row (a circuit breaker). Each time the breaker opens again without a success in between,
the backend sits out twice as long before its next probe.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.backends.base import Backend
from app.config import Config
from app.domain.costs import has_speed_hint, initial_units_per_s
from app.domain.jobs import ExecutorType, Job
from app.engine.arrivals import Arrivals
from app.engine.placement import LARGEST_FIRST_TAIL, where_done_first
from app.engine.queues import WeightedQueue

log = logging.getLogger(__name__)

# Weight of a backend's newest job in its learned speed once it has a few jobs behind it;
# its first jobs count more, so a wrong seed is forgotten quickly.
SPEED_EWMA_WEIGHT = 0.3
FIRST_PROBE_BACKOFF_S = 1.0
# Estimates replay this many dispatches per backend one by one (by then every backend has
# started jobs from the line and their free times are interleaved); jobs further ahead count
# as work spread over the pool. Every intake pays for this replay, so it is kept short.
REPLAYED_ROUNDS = 4
# How many times the estimate re-counts the requests expected to pass a waiting one.
PASSING_ROUNDS = 4
# Weight of each request's finishing time (backend answer -> final sent) in its moving average.
FINISHING_WEIGHT = 0.1


class BackendState(str, enum.Enum):
    STARTING = "starting"  # not probed yet
    HEALTHY = "healthy"  # idle, takes work
    BUSY = "busy"  # running a job
    UNHEALTHY = "unhealthy"  # probe failed or breaker open: no work until a probe answers
    DISABLED = "disabled"  # switched off in EXECUTORS_FILE


@dataclass(eq=False)
class BackendSlot:
    backend: Backend
    units_per_s: float
    probed: bool = False
    up: bool = False
    job: Job | None = None
    started_monotonic: float = 0.0
    consecutive_failures: int = 0
    breaker_opens: int = 0
    cooldown_s: float = 0.0
    last_error: str = ""
    jobs_done: int = 0
    removed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy_s_done: float = 0.0  # backend time of the jobs it has finished (for the busy share)

    @classmethod
    def for_backend(cls, backend: Backend) -> BackendSlot:
        return cls(backend, initial_units_per_s(backend.spec.gpu, backend.spec.speed))

    def free(self) -> None:
        """The backend call returned (or was abandoned): the slot is ready for its next job."""
        if self.job is not None:
            self.busy_s_done += time.monotonic() - self.started_monotonic
        self.job = None

    def busy_seconds(self, now_monotonic: float) -> float:
        """Backend time spent on jobs so far, the running one included."""
        running = now_monotonic - self.started_monotonic if self.job is not None else 0.0
        return self.busy_s_done + running

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def disabled(self) -> bool:
        return self.backend.spec.disabled

    @property
    def in_service(self) -> bool:
        """Healthy and meant to take work (idle or not)."""
        return self.up and not self.disabled and not self.removed

    @property
    def available(self) -> bool:
        return self.in_service and self.job is None

    @property
    def state(self) -> BackendState:
        if self.disabled:
            return BackendState.DISABLED
        if self.job is not None:
            return BackendState.BUSY
        if not self.probed:
            return BackendState.STARTING
        return BackendState.HEALTHY if self.up else BackendState.UNHEALTHY

    def expected_s(self, cost_units: float) -> float:
        return cost_units / self.units_per_s

    def remaining_units(self, now: float) -> float:
        """Work left on the running job, as far as the learned speed can tell."""
        if self.job is None:
            return 0.0
        return max(0.0, self.job.cost_units - (now - self.started_monotonic) * self.units_per_s)

    def seconds_until_free(self, now: float) -> float:
        return self.remaining_units(now) / self.units_per_s

    def record_success(self, cost_units: float, seconds: float) -> None:
        measured = cost_units / max(seconds, 1e-3)
        weight = max(SPEED_EWMA_WEIGHT, 1.0 / (self.jobs_done + 1))
        self.units_per_s = (1 - weight) * self.units_per_s + weight * measured
        self.jobs_done += 1
        self.consecutive_failures = 0
        self.breaker_opens = 0

    def record_failure(
        self, reason: str, *, backend_is_down: bool, breaker_failures: int, max_cooldown_s: float
    ) -> bool:
        """Count a failed job. Returns True if this takes the backend out of service."""
        self.consecutive_failures += 1
        self.last_error = reason
        if not (backend_is_down or self.consecutive_failures >= breaker_failures):
            return False
        self.cooldown_s = min(max_cooldown_s, FIRST_PROBE_BACKOFF_S * 2**self.breaker_opens)
        self.breaker_opens += 1
        self.take_out(reason)
        return True

    def take_out(self, reason: str) -> None:
        if self.up:
            log.warning("backend %s taken out of service: %s", self.name, reason)
        self.up = False
        self.last_error = reason
        self.wake.set()


async def _sleep_or_wake(slot: BackendSlot, seconds: float | None) -> None:
    try:
        async with asyncio.timeout(seconds):
            await slot.wake.wait()
    except TimeoutError:
        pass
    slot.wake.clear()


async def watch_health(slot: BackendSlot, config: Config, on_up: Callable[[], None]) -> None:
    """Probe `slot` for as long as it is in the pool; call `on_up` when it comes (back) up."""
    down_wait_s = min(FIRST_PROBE_BACKOFF_S, config.probe_backoff_max_s)
    while not slot.removed:
        if slot.disabled:
            await _sleep_or_wake(slot, None)
            continue
        if slot.up:
            await _sleep_or_wake(slot, config.health_interval_s)
            # A busy backend proves itself by its job; probing it would only add load.
            if not slot.up or slot.job is not None or slot.removed or slot.disabled:
                continue
            reason = await slot.backend.probe(config.probe_timeout_s)
            if reason:
                slot.take_out(reason)
            continue
        if slot.cooldown_s:
            cooldown, slot.cooldown_s = slot.cooldown_s, 0.0
            await _sleep_or_wake(slot, cooldown)
            if slot.removed or slot.disabled:
                continue
        reason = await slot.backend.probe(config.probe_timeout_s)
        slot.probed = True
        if reason is None:
            slot.up = True
            down_wait_s = min(FIRST_PROBE_BACKOFF_S, config.probe_backoff_max_s)
            log.info("backend %s is healthy", slot.name)
            on_up()
            continue
        if reason != slot.last_error:
            log.warning("backend %s is down: %s", slot.name, reason)
        slot.last_error = reason
        await _sleep_or_wake(slot, down_wait_s)
        down_wait_s = min(down_wait_s * 2, config.probe_backoff_max_s)


class _Replay:
    """The dispatcher's next moves, replayed for an estimate: when each backend in service is
    free (from its running job's expected end), then each job placed in turn by the
    dispatcher's own rule (app/engine/placement.py, where_done_first): a job waits for a busy,
    faster backend when that finishes it sooner, and the jobs behind take the free ones."""

    def __init__(self, serving: list[BackendSlot]) -> None:
        now = time.monotonic()
        self.free_s = [slot.seconds_until_free(now) for slot in serving]
        self.speeds = [slot.units_per_s for slot in serving]
        self.total_speed = sum(self.speeds)
        self.last_run_s = 0.0

    def best(self, cost_units: float, later_s: float = 0.0) -> tuple[int, float]:
        """(backend index, seconds until done) for a job of this cost, every backend `later_s`
        busier than now."""
        free_s = [free_s + later_s for free_s in self.free_s] if later_s else self.free_s
        index = where_done_first(free_s, self.speeds, cost_units)
        return index, free_s[index] + cost_units / self.speeds[index]

    def place(self, cost_units: float) -> float:
        """Place a job; seconds until it is done (and its run time in `last_run_s`)."""
        index = where_done_first(self.free_s, self.speeds, cost_units)
        self.last_run_s = cost_units / self.speeds[index]
        self.free_s[index] += self.last_run_s
        return self.free_s[index]


class ExecutorPool:
    """One executor type: its queue and its backends."""

    def __init__(self, executor: ExecutorType, ratio: tuple[int, int]) -> None:
        self.executor = executor
        self.queue = WeightedQueue(*ratio)
        self.slots: list[BackendSlot] = []
        self.arrivals = Arrivals()
        # Seconds from a backend's answer to its final answer sent (a moving average): the
        # image converted and stored (an S3 upload, when configured), the result committed.
        # Every estimate ends with it.
        self.finishing_s = 0.0

    def available_slots(self) -> list[BackendSlot]:
        return [slot for slot in self.slots if slot.available]

    def in_service(self) -> list[BackendSlot]:
        return [slot for slot in self.slots if slot.in_service]

    def calibrate_unlearned(self) -> None:
        """Backends that have finished nothing yet, and whose speed the executors file does not
        state, are assumed as fast as the median of those already measured: a guess from the
        same pool is closer than the reference GPU's speed (which may be off several times
        over). Their own first job then replaces the guess (app/engine/pool.py, record_success)."""
        learned = sorted(slot.units_per_s for slot in self.slots if slot.jobs_done)
        if not learned:
            return
        median = learned[len(learned) // 2]
        for slot in self.slots:
            spec = slot.backend.spec
            if not slot.jobs_done and not has_speed_hint(spec.gpu, spec.speed):
                slot.units_per_s = median

    def waiting_estimates(self, limit: int) -> list[tuple[Job, float]]:
        """(job, seconds until it is expected to be done) for the first `limit` waiting jobs in
        dispatch order, by the same replay as eta_for_new with each job's own cost (and, as
        there, the other class's arrivals expected to pass it). Empty when no backend is in
        service."""
        serving = self.in_service()
        if not serving:
            return []
        replay = _Replay(serving)
        ahead = {False: 0, True: 0}  # jobs of each class before the one placed
        estimates = []
        for job in self.queue.in_dispatch_order(limit):
            premium = job.premium
            done_s = replay.place(job.cost_units)
            _, _, room = self.queue.picks_ahead(premium, ahead[premium])
            if room:
                starts_s = done_s - replay.last_run_s
                passing = min(float(room), self._passing_rate(premium) * starts_s)
                done_s += passing * (self.arrivals.mean_units(not premium) or job.cost_units) / replay.total_speed
            ahead[premium] += 1
            estimates.append((job, done_s + self.finishing_s))
        return estimates

    def note_finishing(self, seconds: float) -> None:
        """A final answer was sent `seconds` after its backend answered."""
        self.finishing_s += FINISHING_WEIGHT * (seconds - self.finishing_s)

    def note_arrival(self, job: Job) -> None:
        """`job` is about to be queued (its class's rate, size and passes feed the estimates)."""
        _, _, room = self.queue.picks_ahead(job.premium)
        self.arrivals.arrived(job, room)

    def largest_first(self, serving: list[BackendSlot]) -> bool:
        """Whether the dispatcher takes the largest of the first jobs of a class (placement.py):
        near the end of a line that is running out, at most LARGEST_FIRST_TAIL jobs per backend
        in service waiting, and the line draining."""
        return len(self.queue) <= LARGEST_FIRST_TAIL * len(serving) and self.draining(serving)

    def draining(self, serving: list[BackendSlot]) -> bool:
        """Whether the line is running out rather than being fed: nothing has arrived for as
        long as the backends in service take to do the work waiting. Only then is the order
        of the last jobs worth changing (largest first, app/engine/placement.py); in a steady
        flow it would only pass small jobs over."""
        latest = self.arrivals.latest()
        if latest is None:
            return True
        speed = sum(slot.units_per_s for slot in serving)
        return speed > 0 and time.monotonic() - latest >= self.queue.waiting_units / speed

    def _passing_rate(self, premium: bool) -> float:
        """Requests of the other class expected to pass a waiting request of this class, per
        second of its wait (before the ratio's room caps them): the other class's arrival
        rate times the share of such arrivals measured to pass (app/engine/arrivals.py)."""
        return self.arrivals.rate(not premium) * self.arrivals.passing_share(premium)

    def eta_for_new(self, premium: bool, cost_units: float) -> float | None:
        """Seconds until a request of this class and cost, queued now, is expected to be done;
        None when no backend of this type is in service.

        It replays what the dispatcher will do (_Replay): each backend frees when its running
        job is expected to end (from the job's cost and that backend's learned speed); the jobs
        to be taken before this one by the class ratio (WeightedQueue.picks_ahead) are placed
        one by one, with their own costs, each where it will be done first; the other class's
        arrivals expected meanwhile, as far as the ratio lets them pass, add the mean cost of
        that class's recent arrivals.
        Then this one is placed the same way. Only the first REPLAYED_ROUNDS x backends jobs
        ahead are replayed (none when more than twice as many are ahead); the rest count as
        work spread over the pool's total speed, so a request costs at most
        O(REPLAYED_ROUNDS x backends^2) whatever the line's length.
        """
        serving = self.in_service()
        if not serving:
            return None
        # The order is arrival order within each class even near the tail of a backlog, where
        # the dispatcher takes the largest first: that needs a line nothing has fed for a while
        # (draining), and this request feeds it now.
        same, other, room = self.queue.picks_ahead(premium)
        replay = _Replay(serving)
        limit = REPLAYED_ROUNDS * len(serving)
        replayed = {premium: 0, not premium: 0}
        # Far back in a long line, which job goes where first changes little: all of it is
        # spread, and an intake burst does not pay for the replay with every request.
        first_jobs = self.queue.in_dispatch_order(limit) if 0 < same + other <= 2 * limit else []
        for job in first_jobs:
            if replayed[job.premium] >= (same if job.premium == premium else other):
                continue
            replay.place(job.cost_units)
            replayed[job.premium] += 1
        same_units = self.queue.mean_units(premium) or cost_units
        other_units = self.queue.mean_units(not premium) or cost_units
        spread_units = (same - replayed[premium]) * same_units + (other - replayed[not premium]) * other_units
        index, done_s = replay.best(cost_units, spread_units / replay.total_speed)
        # Requests of the other class expected to arrive while this one waits and to pass it,
        # as an expected (fractional) count: each that passes makes the wait longer, in which
        # more arrive, so it is iterated a few rounds towards the fixed point.
        rate, passing = self._passing_rate(premium), 0.0
        arriving_units = self.arrivals.mean_units(not premium) or other_units
        for _ in range(PASSING_ROUNDS):
            starts_s = done_s - cost_units / replay.speeds[index]
            more = min(float(room), rate * starts_s)
            if abs(more - passing) < 0.05:
                break
            passing = more
            index, done_s = replay.best(cost_units, (spread_units + passing * arriving_units) / replay.total_speed)
        return round(done_s + self.finishing_s, 2)

    def status_line(self) -> str:
        return (
            ", ".join(
                f"{slot.name}: {slot.state.value}"
                + (f" ({slot.last_error})" if slot.last_error and not slot.up else "")
                for slot in self.slots
            )
            or "none configured"
        )
