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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from app.backends.base import Backend
from app.config import Config
from app.domain.costs import has_speed_hint, initial_units_per_s
from app.domain.jobs import ExecutorType, Job
from app.engine.arrivals import Arrivals
from app.engine.forecast import Forecast, StandIn
from app.engine.placement import LARGEST_FIRST_BACKLOG, LARGEST_FIRST_TAIL, PLACEMENT_WINDOW, where_done_first
from app.engine.queues import WeightedQueue

log = logging.getLogger(__name__)

# Weight of a backend's newest job in its learned speed once it has a few jobs behind it;
# its first jobs count more, so a wrong seed is forgotten quickly.
SPEED_EWMA_WEIGHT = 0.3
FIRST_PROBE_BACKOFF_S = 1.0
# An intake's estimate runs the dispatcher forward (app/engine/forecast.py) when at most this
# many jobs per backend go first. A forecast costs a decision per job (~20-50 us each here),
# every intake into a short line pays for it, and few jobs ahead are where the order the
# dispatcher picks matters most: a reach of 2, 4, 8 or the whole line gave the same replayed
# errors (bench/scheduling_replay.py, p90 0.26 for all four).
FORECAST_AT_INTAKE = 2
# The periodic revision of waiting requests' estimates (waiting_estimates) forecasts this many
# jobs per backend of each class.
FORECAST_ROUNDS = 4
# Behind more than FORECAST_AT_INTAKE, an intake's estimate places this many jobs per backend
# one by one (the replay's shortcut, no dispatcher walk); jobs further ahead count as work
# spread over the pool.
REPLAYED_ROUNDS = 4
# How many times the estimate re-counts the requests expected to pass a waiting one.
PASSING_ROUNDS = 4
# Requests of the other class expected to pass a waiting one are counted at this share of
# their expected number. Both the `queued` estimate and its revisions are judged by relative
# error, which punishes a wait told too long (without bound) more than one told too short
# (at most -100 %), and this count is the estimate's most uncertain part (how many arrive,
# and whether the flow goes on at all): so the estimate that is off least is below the mean
# outcome. Replayed (bench/scheduling_replay.py), counted whole they left general requests'
# median error at +1 to +3 % (told too long); at this weight the p90 of general requests fell from
# 0.27 to 0.24 (seeds 11-30, and 31-70 held out), and from 0.36 to 0.32 and 0.41 to 0.36 with
# half and three quarters of the requests premium, their median unchanged (0.10). Weights of
# 0.5-0.7 gave the same; 0.7 is the least discount that does.
PASSING_WEIGHT = 0.7
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
    """Far back in a long line, the estimates' shortcut past the forecast
    (app/engine/forecast.py): each job placed in dispatch order where it is done first
    (placement.py, where_done_first), from when each backend is free, without the
    dispatcher's walk. Which job goes where first changes little that far back."""

    def __init__(self, free_s: list[float], speeds: list[float], total_speed: float | None = None) -> None:
        self.free_s = list(free_s)
        self.speeds = speeds
        self.total_speed = sum(speeds) if total_speed is None else total_speed
        self.last_run_s = 0.0

    @classmethod
    def of(cls, serving: ServingNow) -> _Replay:
        return cls(serving.free_s, serving.speeds, serving.total_speed)

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


@dataclass(frozen=True, slots=True)
class ServingNow:
    """The backends in service as a new request's estimate reads them: when each is free and
    how fast it is. Read once for every request of a burst answered together
    (app/engine/estimates.py, BurstReading): nothing else runs on the event loop while they
    are answered, so only the clock moves between them (by well under the estimate's 10 ms
    rounding), and a reading per request was ~20 % of an estimate in a burst (warm, one
    backend)."""

    slots: list[BackendSlot]
    free_s: list[float]  # seconds until each is free
    speeds: list[float]
    total_speed: float

    @classmethod
    def of(cls, slots: list[BackendSlot]) -> ServingNow:
        now = time.monotonic()
        speeds = [slot.units_per_s for slot in slots]
        return cls(slots, [slot.seconds_until_free(now) for slot in slots], speeds, sum(speeds))


@dataclass(frozen=True, slots=True)
class Later:
    """The requests of the other class known to join the line right after a new one (their
    commit is under way as it is estimated: the rest of a burst it came in, estimates.py
    Committing): how many, and their cost in all."""

    other: int
    other_units: float


class ExecutorPool:
    """One executor type: its queue and its backends."""

    def __init__(self, executor: ExecutorType, ratio: tuple[int, int]) -> None:
        self.executor = executor
        self.queue: WeightedQueue[Job] = WeightedQueue(*ratio)
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

    def waiting_estimates(self, limit: int) -> Iterator[tuple[Job, float]]:
        """(job, seconds until it is expected to be done) for the first `limit` waiting jobs in
        dispatch order: the first FORECAST_ROUNDS x backends of each class by the forecast
        (the dispatcher run forward), those behind by the replay's shortcut from where the
        forecast ends; each, as in eta_for_new, later by the other class's arrivals expected
        to pass it. Nothing when no backend is in service.

        Made as they are read: the line and the backends as they were at the first read decide
        the order and the forecast, so a reader may let the event loop run between reads."""
        serving = self.in_service()
        if not serving:
            return
        forecast = Forecast(self.queue, serving, FORECAST_ROUNDS * len(serving))
        foreseen = {id(start.stand_in.job): start for start in forecast.run()}
        # Those behind the forecast's jobs start after them (each class in its order).
        replay = _Replay([max(at, forecast.clock) for at in forecast.free_at], forecast.speeds)
        ahead = {False: 0, True: 0}  # jobs of each class before the one placed
        for job in self.queue.in_dispatch_order(limit):
            premium = job.premium
            start = foreseen.get(id(job))
            if start is not None:
                starts_s, done_s = start.start_s, start.done_s
            else:
                done_s = replay.place(job.cost_units)
                starts_s = done_s - replay.last_run_s
            _, _, room = self.queue.picks_ahead(premium, ahead[premium])
            if room:
                passing = min(float(room), self._passing_rate(premium) * starts_s)
                done_s += passing * (self.arrivals.mean_units(not premium) or job.cost_units) / replay.total_speed
            ahead[premium] += 1
            yield job, done_s + self.finishing_s

    def note_finishing(self, seconds: float) -> None:
        """A final answer was sent `seconds` after its backend answered."""
        self.finishing_s += FINISHING_WEIGHT * (seconds - self.finishing_s)

    def note_arrival(self, job: Job) -> None:
        """`job` is about to be queued (its class's rate, size and passes feed the estimates)."""
        _, _, room = self.queue.picks_ahead(job.premium)
        self.arrivals.arrived(job, room)

    def largest_first(self, serving: list[BackendSlot]) -> bool:
        """Whether the dispatcher takes the largest of the first jobs of a class (placement.py):
        near the end of a backlog that is running out: at most LARGEST_FIRST_TAIL jobs per
        backend in service waiting, after at least LARGEST_FIRST_BACKLOG per backend waited at
        once since the line was last empty, and the line draining."""
        backends = len(serving)
        return (
            len(self.queue) <= LARGEST_FIRST_TAIL * backends
            and self.queue.backlog_peak >= LARGEST_FIRST_BACKLOG * backends
            and self.draining(serving)
        )

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
        rate times the share of such arrivals measured to pass (app/engine/arrivals.py), counted
        at PASSING_WEIGHT."""
        return self.arrivals.rate(not premium) * self.arrivals.passing_share(premium) * PASSING_WEIGHT

    def serving_now(self) -> ServingNow:
        return ServingNow.of(self.in_service())

    def eta_for_new(
        self, premium: bool, cost_units: float, later: Later | None = None, serving_now: ServingNow | None = None
    ) -> float | None:
        """Seconds until a request of this class and cost, queued now, is expected to be done;
        None when no backend of this type is in service.

        With at most FORECAST_AT_INTAKE jobs per backend to go first, the dispatcher is run
        forward on a copy of the line with this request at its tail (app/engine/forecast.py):
        each backend frees when its running job is expected to end (the job's cost over that
        backend's learned speed), and at each such moment the dispatcher's own decision
        (placement.py) starts the next job, until this one starts. Behind more, the replay's
        shortcut places the jobs to go first (WeightedQueue.picks_ahead: the class ratio's
        picks, from its current turn) one by one in dispatch order, each where it is done
        first, up to REPLAYED_ROUNDS per backend; beyond those (or when more than twice as
        many go first) they count as work spread over the pool's total speed. An intake so
        costs at most a forecast of a few jobs per backend, whatever the line's length.
        Then the other class's requests that pass it (as far as the ratio leaves them room)
        add their cost, spread over the pool: first those known to join the line right
        after it (`later`), unless it starts at once; then those expected to arrive while it
        waits, at the mean cost of that class's recent arrivals. Last, the time results lately
        took from backend answer to final. `serving_now` is the backends as read for this
        request's burst; they are read now without it.
        """
        serving = serving_now or self.serving_now()
        if not serving.slots:
            return None
        same, other, room = self.queue.picks_ahead(premium)
        # The order is arrival order within each class even near the tail of a backlog, where
        # the dispatcher takes the largest first: that needs a line nothing has fed for a while
        # (draining), and this request feeds it now.
        start = None
        if same + other <= FORECAST_AT_INTAKE * len(serving.slots) and self.queue.takeable(premium) == same:
            # The copy holds those to go first and those a placement window behind them (which
            # may start first when the ones ahead wait for a busy backend).
            forecast = Forecast(self.queue, serving.slots, same + other + PLACEMENT_WINDOW)
            this = StandIn(None, premium, cost_units)
            forecast.add(this)
            start = next((start for start in forecast.run() if start.stand_in is this), None)
        if start is not None:
            starts_s, done_s = start.start_s, start.done_s
        else:
            starts_s, done_s = self._replayed(premium, cost_units, same, other, serving)
        # Requests of the other class known to join the line right after this one pass it as
        # far as the ratio leaves them room, unless it starts at once.
        total_speed = serving.total_speed
        known_s = 0.0
        if later is not None and later.other and starts_s > 0:
            known = min(room, later.other)
            room -= known
            known_s = known * later.other_units / later.other / total_speed
        # Then those expected to arrive while it waits and to pass it, as an expected
        # (fractional) count: each that passes makes the wait longer, in which more arrive,
        # so it is iterated a few rounds towards the fixed point.
        rate, passing = self._passing_rate(premium), 0.0
        arriving_units = self.arrivals.mean_units(not premium) or self.queue.mean_units(not premium) or cost_units
        each_s = arriving_units / total_speed
        for _ in range(PASSING_ROUNDS):
            more = min(float(room), rate * (starts_s + known_s + passing * each_s))
            if abs(more - passing) < 0.05:
                break
            passing = more
        return round(done_s + known_s + passing * each_s + self.finishing_s, 2)

    def _replayed(
        self, premium: bool, cost_units: float, same: int, other: int, serving: ServingNow
    ) -> tuple[float, float]:
        """(seconds until it starts, until it is done) for a request of this class and cost
        queued now behind `same` of its class and `other` of the other, by the replay's
        shortcut (eta_for_new)."""
        replay = _Replay.of(serving)
        limit = REPLAYED_ROUNDS * len(serving.slots)
        replayed = {premium: 0, not premium: 0}
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
        return done_s - cost_units / replay.speeds[index], done_s

    def status_line(self) -> str:
        return (
            ", ".join(
                f"{slot.name}: {slot.state.value}"
                + (f" ({slot.last_error})" if slot.last_error and not slot.up else "")
                for slot in self.slots
            )
            or "none configured"
        )
