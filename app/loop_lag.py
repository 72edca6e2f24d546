"""How late the event loop runs what is due. Everything this server does shares one event loop:
while one callback holds it (a long burst of requests being parsed, a slow estimate pass) or the
process gets no CPU, every connection, `/health` probe, progress poll and dispatch waits. So a
timer is set every LAG_PROBE_S, and how much later than asked it fires is what everything due
then waited. Each such lag is counted in the `devoid_event_loop_lag_seconds` histogram; one of
LAG_WARN_S or more is also logged (at most once per LAG_WARN_EVERY_S, with how many there were
since the last such line), since a loop held for seconds looks to clients like a server that
hangs.

A timer may fire up to the loop's clock resolution early (asyncio runs what is due within it);
such lags count as 0."""

from __future__ import annotations

import asyncio
import logging
import time

from app.metrics import Metrics

log = logging.getLogger(__name__)

LAG_PROBE_S = 0.25
LAG_WARN_S = 1.0
LAG_WARN_EVERY_S = 60.0


class LoopLag:
    """`run()` probes the running loop until cancelled."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._warned_at: float | None = None
        self._unwarned = 0  # lags past LAG_WARN_S not logged yet (within LAG_WARN_EVERY_S of the last line)
        self._worst_unwarned_s = 0.0

    async def run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            self.observe(max(0.0, time.monotonic() - asked - LAG_PROBE_S))

    def observe(self, lag_s: float) -> None:
        self._metrics.loop_lag.observe(lag_s)
        if lag_s < LAG_WARN_S:
            return
        self._unwarned += 1
        self._worst_unwarned_s = max(self._worst_unwarned_s, lag_s)
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < LAG_WARN_EVERY_S:
            return
        log.warning(
            "the event loop ran %.1f s late (%d such stall(s) since the last line): every connection, "
            "probe and dispatch waited; a callback held the loop or the process had no CPU",
            self._worst_unwarned_s,
            self._unwarned,
        )
        self._warned_at, self._unwarned, self._worst_unwarned_s = now, 0, 0.0
