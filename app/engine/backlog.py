"""Reading the stored queue back at start-up, a page at a time, while the server already serves.

A restart must not wait for 100,000 queued rows to become Jobs before it accepts and
dispatches. `start()` reads a summary (how many wait per line and per user: the estimates and
the limits count them from the first moment) and returns; a task then reads the rows in
arrival order, BACKLOG_PAGE_ROWS at a time, and hands each to the scheduler, dispatching
after every page.

Order stays exact: a page goes in line ahead of every request that arrived since the start
(WeightedQueue.push_backlog), and such an arrival is not taken while older requests of its
line are still unread. Every lookup by id that the scheduler answers from memory (a cancel)
waits for `loaded` when the id is not held yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app.domain.jobs import ExecutorType, Job
from app.engine.admission import Admission
from app.engine.pool import ExecutorPool
from app.storage.request_rows import no_cycle_collection
from app.storage.store import Store

log = logging.getLogger(__name__)

# Rows turned into queued jobs per step. Each page holds the event loop for about 20 ms on a
# 2-core machine (intake and dispatch run between pages); larger pages gain little.
BACKLOG_PAGE_ROWS = 1000
# A page the database refused to read is asked for again after this.
RETRY_S = 1.0


class BacklogReader:
    """Reads one start's backlog back; `loaded` is set once it is all held (or reading stopped)."""

    def __init__(
        self,
        store: Store,
        pools: dict[ExecutorType, ExecutorPool],
        admission: Admission,
        take: Callable[[Job], None],
        dispatch: Callable[[], None],
        page_rows: int = BACKLOG_PAGE_ROWS,
    ) -> None:
        self._store = store
        self._pools = pools
        self._admission = admission
        self._take = take
        self._dispatch = dispatch
        self._page_rows = page_rows
        self._unread: dict[tuple[ExecutorType, bool], int] = {}
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()
        self.read = 0
        self.total = 0

    async def start(self) -> int:
        """Count the backlog and start reading it back. Returns how many requests it holds."""
        summary = await self._store.reads.backlog_summary()
        self._unread = dict(summary.by_line)
        self._tell_queues()
        self._admission.expect_backlog(summary.by_user)
        self.total = summary.total
        self._task = asyncio.create_task(self._read_all(summary.last_seq), name="backlog")
        return summary.total

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])

    async def _read_all(self, last_seq: int) -> None:
        """Read the queued requests up to `last_seq` (what arrives later is queued by intake).
        The next page is fetched (on the database's thread) while this one is queued."""
        started = time.monotonic()
        fetching_from: int | None = 0  # where the page being fetched starts
        fetching = self._fetch(0, last_seq)
        try:
            while fetching_from is not None:
                try:
                    page, after_seq = await fetching
                except Exception as exc:  # the database refused a read: try that page again
                    log.warning("reading the queued backlog back failed (%s); trying again in %g s", exc, RETRY_S)
                    await asyncio.sleep(RETRY_S)
                    fetching = self._fetch(fetching_from, last_seq)
                    continue
                fetching_from = after_seq
                if after_seq is not None:
                    fetching = self._fetch(after_seq, last_seq)
                # What is read here lives until it is dispatched: kept out of the cycle
                # collector's full passes, which would otherwise walk the growing queue again
                # and again (see no_cycle_collection).
                with no_cycle_collection(then_freeze=True):
                    for job in page:
                        line = (job.executor, job.premium)
                        self._unread[line] = self._unread.get(line, 0) - 1
                        self._take(job)
                self.read += len(page)
                self._tell_queues()
                self._dispatch()
        except Exception:
            # A bug, not the database (its refusals are retried above). The rows not read stay
            # queued in SQLite and resume at the next start; this run serves what it holds.
            log.exception("reading the queued backlog back stopped after %d of %d requests", self.read, self.total)
            raise
        finally:
            fetching.cancel()  # a page fetched ahead, if reading stopped before it
            # Done (or stopped): nothing unread holds arrivals back any longer.
            self._unread.clear()
            self._tell_queues()
            self._admission.backlog_read()
            self.loaded.set()
        if self.total:
            log.info(
                "backlog read back: %d of %d queued requests in %.2f s",
                self.read,
                self.total,
                time.monotonic() - started,
            )
        self._dispatch()

    def _fetch(self, after_seq: int, last_seq: int) -> asyncio.Task[tuple[list[Job], int | None]]:
        return asyncio.create_task(self._store.reads.queued_page(after_seq, last_seq, self._page_rows))

    def _tell_queues(self) -> None:
        for executor, pool in self._pools.items():
            for premium in (False, True):
                pool.queue.set_unread(premium, max(0, self._unread.get((executor, premium), 0)))
