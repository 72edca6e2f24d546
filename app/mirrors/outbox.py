"""Draining one mirror's outbox rows, in order, through outages.

One worker per mirror. It takes the oldest rows, hands them to the mirror, and deletes the
ones the mirror has. When the mirror fails, the rest stay and the worker waits (0.5 s,
doubling to MIRROR_RETRY_MAX_S) before trying the oldest again, so work drains in the order
it was queued. New rows wake it at once; an empty outbox costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

from app.storage.group_commit import StoreClosed
from app.storage.outbox_rows import OutboxItem
from app.storage.store import Store

log = logging.getLogger(__name__)

BATCH_ROWS = 100
FIRST_RETRY_S = 0.5
START_CHECK_TIMEOUT_S = 10.0


@dataclass
class MirrorHealth:
    """What an operator sees of a mirror (logged on every change of `state`)."""

    name: str
    state: str = "starting"  # starting (nothing sent yet) | connected | down
    backlog: int = 0
    last_error: str = ""
    last_success_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class OutboxWorker:
    """Base of a mirror: subclasses set `target` and implement `deliver`."""

    target = ""

    def __init__(self, store: Store, retry_max_s: float) -> None:
        self._store = store
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mirror_retry_s = FIRST_RETRY_S
        self.health = MirrorHealth(self.target)

    def notify(self) -> None:
        """New rows were committed for this mirror."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mirror-{self.target}")

    async def stop(self) -> None:
        """Stop at once; rows not yet delivered stay in the outbox for the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def deliver(self, items: list[OutboxItem], done: list[int]) -> None:
        """Hand `items` to the mirror, appending each row id to `done` once the mirror has it.
        Raises on the first failure (rows after it are tried again later)."""
        raise NotImplementedError

    async def check(self) -> None:
        """A cheap round trip to the mirror's server; raises when it is not usable."""
        raise NotImplementedError

    async def _check_at_start(self) -> None:
        # One clear line at start-up either way; a failure stops nothing (work is retried).
        try:
            async with asyncio.timeout(START_CHECK_TIMEOUT_S):
                await self.check()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_state(
                "down", backlog=await self._store.outbox.count(self.target), error=f"{type(exc).__name__}: {exc}"[:300]
            )
            return
        self._set_state("connected", backlog=await self._store.outbox.count(self.target))

    async def _run(self) -> None:
        store_retry_s = FIRST_RETRY_S
        checked = False
        while True:
            try:
                if not checked:
                    await self._check_at_start()
                    checked = True
                await self._drain_once()
                store_retry_s = FIRST_RETRY_S
            except asyncio.CancelledError:
                raise
            except StoreClosed:
                return
            except Exception as exc:
                # The database refused to read or update the outbox (disk full, locked): the
                # rows are still there, so try again; a row delivered twice is harmless
                # (revision-guarded records, uploads that overwrite).
                log.warning(
                    "mirror %s: the outbox could not be read or updated (%s); retrying in %.1f s",
                    self.target,
                    f"{type(exc).__name__}: {exc}"[:300],
                    store_retry_s,
                )
                await asyncio.sleep(store_retry_s)
                store_retry_s = min(store_retry_s * 2, self._retry_max_s)

    async def _drain_once(self) -> None:
        """Deliver one batch, or wait for work. A failing mirror is retried with backoff here;
        a failing store raises to _run."""
        self._wake.clear()
        items = await self._store.outbox.batch(self.target, BATCH_ROWS)
        if not items:
            # Nothing to send says nothing of the server: the state stays as it was.
            self.health.backlog = 0
            await self._wake.wait()
            return
        done: list[int] = []
        try:
            await self.deliver(items, done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if done:
                await self._store.outbox.done(done)
            failed = items[len(done)] if len(done) < len(items) else items[-1]
            reason = f"{type(exc).__name__}: {exc}"[:300]
            await self._store.outbox.failed(failed.id, reason)
            self._set_state("down", backlog=await self._store.outbox.count(self.target), error=reason)
            await asyncio.sleep(self._mirror_retry_s)
            self._mirror_retry_s = min(self._mirror_retry_s * 2, self._retry_max_s)
            return
        await self._store.outbox.done(done)
        self._mirror_retry_s = FIRST_RETRY_S
        self.health.last_success_at = time.time()
        self._set_state("connected", backlog=await self._store.outbox.count(self.target))

    def _set_state(self, state: str, *, backlog: int, error: str = "") -> None:
        previous = self.health.state
        self.health.backlog = backlog
        if error:
            self.health.last_error = error
        self.health.state = state
        if state == previous:
            return
        if state == "down":
            log.warning("mirror %s is down (%s); %d items wait and will be retried", self.target, error, backlog)
        else:
            log.info("mirror %s is connected; %d items wait", self.target, backlog)
