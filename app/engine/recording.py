"""How the scheduler writes down a request's changes and tells its client, without either
one able to lose the request or hold a backend:

- a change (claim, requeue, final state) is committed with retries while the database
  refuses writes (a full disk, a read-only or locked database): the request stays owned
  meanwhile, and its client hears of the delay once;
- a message to a client is sent from a task of its own: a client that stops reading its
  socket must not hold a GPU for everyone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from app.domain.jobs import Job
from app.domain.lifecycle import Phase, TrackedRequest
from app.storage.group_commit import StoreClosed

log = logging.getLogger(__name__)

# A commit the database refused is tried again after this, doubling up to the max: a full
# disk or a locked database usually clears in seconds to minutes, and a retry costs little.
STORE_RETRY_FIRST_S = 0.2
STORE_RETRY_MAX_S = 5.0


class Recording:
    def __init__(self, storage_retry_notice: Callable[[Job, str], Coroutine[Any, Any, None]]) -> None:
        # The client's message that its request's change waits for the database.
        self._storage_retry_notice = storage_retry_notice
        self._telling: set[asyncio.Task[None]] = set()

    async def persist(
        self, tracked: TrackedRequest, phase: Phase, what: str, write: Callable[[], Awaitable[None]]
    ) -> bool:
        """Commit a change of a request (`write`), retrying with backoff while the database
        refuses writes. Returns False, with nothing written, when the request left `phase`
        meanwhile (a cancel) or the store was closed (shutdown: SQLite still has the previous
        state, which the next start resumes from)."""
        delay_s = STORE_RETRY_FIRST_S
        told = False
        while True:
            try:
                await write()
                if told:
                    log.info("%s: the %s was recorded after the database took writes again", tracked.object_id, what)
                return True
            except StoreClosed:
                return False
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:300]
                if not told:
                    told = True
                    log.error(
                        "%s: recording its %s failed (%s); retrying until the database takes writes again",
                        tracked.object_id,
                        what,
                        reason,
                    )
                    self.tell(self._storage_retry_notice(tracked.job, reason))
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, STORE_RETRY_MAX_S)
            if tracked.phase is not phase:
                return False

    def tell(self, message: Coroutine[Any, Any, None]) -> None:
        """Send a message to a client without waiting for its socket."""
        task = asyncio.create_task(message)
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def stop(self) -> None:
        """Drop the messages still being sent (shutdown)."""
        for task in list(self._telling):
            task.cancel()
