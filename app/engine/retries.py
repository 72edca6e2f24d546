"""What follows a backend call that failed: whom to blame, and what becomes of the request.

- The backend was down (no answer): it is charged (its circuit breaker) and the request is
  retried elsewhere.
- The backend answered with a failure: that is its fault or the request's. The backend becomes
  a suspect; a request that fails on two different backends is the cause, ends with an
  `invalid_input:` error and no backend is charged. A request that later works elsewhere
  charges its suspects after all (`served`).
- Otherwise the request waits a backoff (doubling per attempt, jittered), committed as
  requeued, then goes back to the head of its line; after MAX_ATTEMPTS (config) it ends with
  the last failure's reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from app.config import Config
from app.domain.errors import BackendFailed
from app.domain.lifecycle import Phase, TrackedRequest
from app.engine.finishing import Finishing
from app.engine.listener import JobListener
from app.engine.pool import BackendSlot
from app.engine.recording import Recording
from app.storage.store import Store

log = logging.getLogger(__name__)


class Retries:
    def __init__(
        self,
        config: Config,
        store: Store,
        listener: JobListener,
        recording: Recording,
        finishing: Finishing,
        back_in_line: Callable[[TrackedRequest], None],
    ) -> None:
        self._config = config
        self._store = store
        self._listener = listener
        self._recording = recording
        self._finishing = finishing
        # Puts a request whose backoff ended at the head of its line (the scheduler's).
        self._back_in_line = back_in_line
        self.retried = 0

    def served(self, slot: BackendSlot, tracked: TrackedRequest) -> None:
        """The request worked on `slot`: the backends that failed it are to blame after all."""
        for suspect in tracked.suspects:
            self.charge(suspect, f"failed a request that {slot.name} then served")

    async def after_failure(self, slot: BackendSlot, tracked: TrackedRequest, failure: BackendFailed) -> None:
        """After an attempt that failed on `slot` (a retryable failure): blame, then a retry
        after a backoff, or the request's final error."""
        config = self._config
        job = tracked.job
        job.avoid_backends.add(slot.name)
        if failure.backend_is_down:
            self.charge(slot, failure.reason, backend_is_down=True)
        else:
            # The backend answered, and failed: its fault or the request's (see suspects).
            tracked.suspects.append(slot)
            blamed = sorted({suspect.name for suspect in tracked.suspects})
            if len(blamed) >= 2:
                log.warning(
                    "%s failed on %s: blamed on the request, not the backends", job.object_id, " and ".join(blamed)
                )
                self._finishing.begin(
                    tracked,
                    None,
                    (
                        f"invalid_input: the request failed on {len(blamed)} backends ({', '.join(blamed)}); "
                        f"the request itself looks like the cause, so it is not retried. The last: "
                        f"{failure.reason}"
                    ),
                    None,
                )
                return
        if job.attempts >= config.max_attempts:
            for suspect in tracked.suspects:  # one backend failed it every time: its fault
                self.charge(suspect, failure.reason)
            reason = f"Failed after {job.attempts} attempts; the last: {failure.reason}"
            self._finishing.begin(tracked, None, reason, None)
            return
        delay_s = config.retry_backoff_s * 2 ** (job.attempts - 1) * random.uniform(0.75, 1.25)
        tracked.wait_retry()
        if not await self._recording.persist(
            tracked, Phase.RETRY_WAIT, "requeue", lambda: self._store.requeue(job, failure.reason)
        ):
            return
        if tracked.phase is not Phase.RETRY_WAIT:
            return  # cancelled or expired while the requeue was committed
        self.retried += 1
        log.warning(
            "%s attempt %d failed on %s (%s); retrying in %.1f s",
            job.object_id,
            job.attempts,
            slot.name,
            failure.reason,
            delay_s,
        )
        self._recording.tell(self._listener.job_retrying(job, failure.reason, delay_s))
        tracked.set_retry_timer(asyncio.get_running_loop().call_later(delay_s, self._back_in_line, tracked))

    def charge(self, slot: BackendSlot, reason: str, *, backend_is_down: bool = False) -> None:
        """Count a failure against a backend (its circuit breaker)."""
        config = self._config
        slot.record_failure(
            reason,
            backend_is_down=backend_is_down,
            breaker_failures=config.breaker_failures,
            max_cooldown_s=config.probe_backoff_max_s,
        )
