"""When waiting requests give up (MAX_QUEUE_WAIT_S): one timer for all of them.

A timer per request cost a TimerHandle and a push on the event loop's heap for every accept,
and half a second to arm 100,000 of them at a restart. Here deadlines wait in one heap of
(deadline, object_id), and a single timer is armed for the earliest. An entry whose request
finished, or got a new deadline, is not removed: it is recognised as stale when it comes up
(`is_current`), and the heap is rebuilt from the current entries when stale ones outnumber
them.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

# Rebuild once the heap holds this many entries more than twice the current ones.
COMPACT_SLACK = 1024


class ExpiryLine:
    def __init__(
        self,
        on_expired: Callable[[str], None],
        is_current: Callable[[str, float], bool],
        current_count: Callable[[], int],
    ) -> None:
        """`on_expired(object_id)` is called for each current entry whose deadline passed;
        `is_current(object_id, deadline)` says whether an entry still stands, and
        `current_count()` about how many do."""
        self._on_expired = on_expired
        self._is_current = is_current
        self._current_count = current_count
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def armed(self) -> bool:
        """A timer is set: some entry will be looked at when its deadline comes."""
        return self._timer is not None

    def add(self, object_id: str, deadline: float) -> None:
        """Expire `object_id` at `deadline` (time.time() seconds) unless it is no longer
        current by then."""
        heapq.heappush(self._heap, (deadline, object_id))
        if len(self._heap) > 2 * self._current_count() + COMPACT_SLACK:
            self._compact()
        if deadline < self._armed_for:
            self._arm(deadline)

    def close(self) -> None:
        """No more expiries (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_for = None, float("inf")

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.time()), self._fire)
        self._armed_for = deadline

    def _fire(self) -> None:
        self._timer, self._armed_for = None, float("inf")
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            deadline, object_id = heapq.heappop(self._heap)
            if self._is_current(object_id, deadline):
                self._on_expired(object_id)
        if self._heap:
            self._arm(self._heap[0][0])

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if self._is_current(entry[1], entry[0])]
        heapq.heapify(self._heap)
