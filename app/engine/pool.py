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
from app.domain.costs import initial_units_per_s
from app.domain.jobs import ExecutorType, Job
from app.engine.queues import WeightedQueue

log = logging.getLogger(__name__)

# Weight of a backend's newest job in its learned speed once it has a few jobs behind it;
# its first jobs count more, so a wrong seed is forgotten quickly.
SPEED_EWMA_WEIGHT = 0.3
FIRST_PROBE_BACKOFF_S = 1.0


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

    @classmethod
    def for_backend(cls, backend: Backend) -> BackendSlot:
        return cls(backend, initial_units_per_s(backend.spec.gpu, backend.spec.speed))

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


class ExecutorPool:
    """One executor type: its queue and its backends."""

    def __init__(self, executor: ExecutorType, ratio: tuple[int, int]) -> None:
        self.executor = executor
        self.queue = WeightedQueue(*ratio)
        self.slots: list[BackendSlot] = []

    def available_slots(self) -> list[BackendSlot]:
        return [slot for slot in self.slots if slot.available]

    def in_service(self) -> list[BackendSlot]:
        return [slot for slot in self.slots if slot.in_service]

    def eta_for_new(self, premium: bool, cost_units: float) -> float | None:
        """Seconds until a request of this class and cost, queued now, is expected to be done;
        None when no backend of this type is in service."""
        serving = self.in_service()
        if not serving:
            return None
        fastest_free = max((s.units_per_s for s in serving if s.job is None), default=None)
        ahead = self.queue.picks_before_new(premium)
        if ahead == 0 and fastest_free:
            return round(cost_units / fastest_free, 1)
        now = time.monotonic()
        total_speed = sum(slot.units_per_s for slot in serving)
        mean_waiting = self.queue.waiting_units / len(self.queue) if len(self.queue) else cost_units
        backlog_units = sum(slot.remaining_units(now) for slot in serving) + ahead * mean_waiting
        return round(backlog_units / total_speed + cost_units / (total_speed / len(serving)), 1)

    def status_line(self) -> str:
        return (
            ", ".join(
                f"{slot.name}: {slot.state.value}"
                + (f" ({slot.last_error})" if slot.last_error and not slot.up else "")
                for slot in self.slots
            )
            or "none configured"
        )
