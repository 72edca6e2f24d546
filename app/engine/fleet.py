"""The backends as the scheduler holds them: one ExecutorPool per executor type (its line and
its backends), each backend's health watcher for as long as it is in the pool, a new
EXECUTORS_FILE applied while running (`reload`), and what the status page shows of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from app.backends.base import Backend, BackendSpec
from app.config import Config
from app.domain.costs import REFERENCE_JOB_UNITS, payload_cost_units
from app.domain.jobs import ExecutorType, GenType
from app.engine.pool import BackendSlot, ExecutorPool, watch_health

log = logging.getLogger(__name__)


class Fleet:
    """`on_change` is called when a backend may take work it could not before (one came up,
    or the executors file changed): the scheduler's dispatch."""

    def __init__(self, config: Config, make_backend: Callable[[BackendSpec], Backend], on_change: Callable[[], None]):
        self._config = config
        self._make_backend = make_backend
        self._on_change = on_change
        self.pools = {executor: ExecutorPool(executor, config.general_premium_ratio) for executor in ExecutorType}
        self._watchers: dict[BackendSlot, asyncio.Task[None]] = {}

    def has_backends(self, executor: ExecutorType) -> bool:
        return bool(self.pools[executor].slots)

    def add(self, backend: Backend) -> BackendSlot:
        """Put a backend in its pool and start watching its health."""
        slot = BackendSlot.for_backend(backend)
        self.pools[backend.executor].slots.append(slot)
        task = asyncio.create_task(watch_health(slot, self._config, self._on_change), name=f"health-{backend.name}")
        self._watchers[slot] = task
        task.add_done_callback(lambda _: self._watchers.pop(slot, None))
        return slot

    def retire_if_removed(self, slot: BackendSlot) -> None:
        """A backend taken out of the executors file leaves its pool once its job is over."""
        pool = self.pools[slot.backend.executor]
        if slot.removed and slot.job is None and slot in pool.slots:
            pool.slots.remove(slot)
            log.info("backend %s removed", slot.name)

    def reload(self, specs: list[BackendSpec]) -> None:
        """Apply a new EXECUTORS_FILE: add, change, disable or remove backends. A removed
        backend's running job finishes there (or is retried elsewhere if it fails)."""
        current = {slot.name: slot for pool in self.pools.values() for slot in pool.slots if not slot.removed}
        wanted = {spec.name: spec for spec in specs}
        for name, slot in current.items():
            spec = wanted.get(name)
            if spec is None or spec.exec_type is not slot.backend.executor:
                _stop_watching(slot)
                self.retire_if_removed(slot)
                log.info("backend %s leaves the pool%s", name, " after its job" if slot.job else "")
        for name, spec in wanted.items():
            existing = current.get(name)
            if existing is not None and not existing.removed:
                if existing.backend.spec != spec:
                    # The running job keeps its client; the next one uses the new settings.
                    existing.backend = self._make_backend(spec)
                    existing.wake.set()
                    log.info("backend %s updated%s", name, " (disabled)" if spec.disabled else "")
                continue
            self.add(self._make_backend(spec))
            log.info("backend %s added (%s at %s)", name, spec.exec_type.value, spec.endpoint)
        self._on_change()

    async def stop_watching(self) -> None:
        """End every health watcher (at shutdown) and wait for them."""
        for slot in list(self._watchers):
            _stop_watching(slot)
        if self._watchers:
            await asyncio.wait(list(self._watchers.values()))

    def queues_status(self) -> list[dict[str, Any]]:
        """Per executor type: who waits, what runs, and the ETA of a typical new request."""
        states = []
        for executor, pool in self.pools.items():
            typical = payload_cost_units(executor, GenType.TEXT2IMG, {})
            states.append(
                {
                    "executor": executor.value,
                    "general_waiting": pool.queue.waiting(False),
                    "premium_waiting": pool.queue.waiting(True),
                    "generating": sum(1 for slot in pool.slots if slot.job is not None),
                    "backends": len(pool.slots),
                    "backends_in_service": len(pool.in_service()),
                    "eta_new_general_s": pool.eta_for_new(False, typical),
                    "eta_new_premium_s": pool.eta_for_new(True, typical),
                }
            )
        return states

    def backends_status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": slot.name,
                "executor": pool.executor.value,
                "state": slot.state.value,
                "units_per_s": round(slot.units_per_s),
                "images_per_minute": round(slot.units_per_s * 60 / REFERENCE_JOB_UNITS, 2),
                "jobs_done": slot.jobs_done,
                "last_error": slot.last_error,
                "job": slot.job.object_id if slot.job else None,
            }
            for pool in self.pools.values()
            for slot in pool.slots
        ]


def _stop_watching(slot: BackendSlot) -> None:
    slot.removed = True
    slot.wake.set()
