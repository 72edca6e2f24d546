"""A budget of message bytes between receipt and commit: server-wide for large messages, and
per connection for all it sends (app/web/gateway.py, MAX_PENDING_BYTES).

Each large message (an img2img image) is held several times over while it is parsed, checked
and committed; without a bound, a few connections pipelining 15 MB frames took the process
past a gigabyte. A connection whose next large message does not fit waits (and stops reading
its socket: backpressure) until earlier ones are committed. Waiters are served in arrival
order, and a message larger than the whole budget passes alone.
"""

from __future__ import annotations

import asyncio
import collections


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, size: int) -> int:
        """Wait until `size` bytes fit, and hold them; returns what to give back."""
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give(size)  # granted just as the connection went away
            raise
        return size

    def give(self, size: int) -> None:
        self.used -= size
        while self._waiters and (self.used + self._waiters[0][0] <= self.limit or self.used == 0):
            wanted, granted = self._waiters.popleft()
            if granted.done():  # its connection went away while it waited
                continue
            self.used += wanted
            granted.set_result(None)
