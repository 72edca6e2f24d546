"""What the status page charts: the last hour of the server, sampled in memory every SAMPLE_S
(queue depth per executor and class, finished requests in the minute before, each backend's
busy share since the previous sample) plus, per finished request, the time it was told
(`avg_time` of `queued`) beside the time it took. Nothing here is stored: a restart starts
the charts afresh.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from app.engine.scheduler import Scheduler
from app.metrics import Metrics

SAMPLE_S = 10.0
HISTORY_S = 3600.0


class StatusHistory:
    def __init__(self, scheduler: Scheduler, metrics: Metrics) -> None:
        self._scheduler = scheduler
        self._metrics = metrics
        self._samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=int(HISTORY_S / SAMPLE_S))
        # backend -> (monotonic time, its busy seconds) at the last stored sample
        self._busy_at_last: dict[str, tuple[float, float]] = {}

    async def run(self) -> None:
        while True:
            self._samples.append(self._point(store=True))
            await asyncio.sleep(SAMPLE_S)

    def as_dict(self) -> dict[str, Any]:
        """The stored samples and one taken now, and the told/actual times of the last hour."""
        since = time.time() - HISTORY_S
        eta = [
            {"t": finished_at, "told_s": told_s, "actual_s": actual_s}
            for finished_at, told_s, actual_s in self._metrics.finishes
            if finished_at >= since and told_s is not None
        ]
        return {"sample_s": SAMPLE_S, "samples": [*self._samples, self._point(store=False)], "eta": eta}

    def _point(self, *, store: bool) -> dict[str, Any]:
        now, now_monotonic = time.time(), time.monotonic()
        queues = []
        busy: dict[str, float] = {}
        for executor, pool in self._scheduler.pools.items():
            for premium in (False, True):
                queues.append(
                    {
                        "executor": executor.value,
                        "class": "premium" if premium else "general",
                        "waiting": pool.queue.waiting(premium),
                    }
                )
            for slot in pool.slots:
                busy_s = slot.busy_seconds(now_monotonic)
                then, busy_then = self._busy_at_last.get(slot.name, (now_monotonic - SAMPLE_S, busy_s))
                window = now_monotonic - then
                busy[slot.name] = round(min(1.0, max(0.0, (busy_s - busy_then) / window)) if window > 0 else 0.0, 3)
                if store:
                    self._busy_at_last[slot.name] = (now_monotonic, busy_s)
        finished_last_minute = sum(1 for finished_at, _, _ in self._metrics.finishes if finished_at >= now - 60)
        return {"t": now, "queues": queues, "finished_last_minute": finished_last_minute, "busy": busy}
