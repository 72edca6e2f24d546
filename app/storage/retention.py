"""Retention: finished requests older than RETENTION_S are pruned to a summary, and summaries
older than SUMMARY_RETENTION_S are deleted, so the database and the images folder stay bounded
under a steady load.

A pass takes the oldest finished requests past the retention time, at most PRUNE_BATCH_ROWS
(and PRUNE_BATCH_PAYLOAD_CHARS of payload) at a time: their local image files are deleted
(with any copy of one a crash left half-written), then one transaction drops their payloads
and image results (app/storage/retention_rows.py `prune`). Batches are small and go through
the store's writer queue like any other write, so intake's commits interleave with them
instead of waiting behind one long delete. Files go first: a crash between the two leaves
the rows unpruned, and the next pass finishes them (a missing file is fine), never an
orphaned image.

S3 images are not deleted here: a bucket lifecycle rule does that (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from app.metrics import Metrics
from app.storage.results import IMAGE_FILE_NAME, image_file_name, unfinished_copy
from app.storage.store import Store

log = logging.getLogger(__name__)

PRUNE_BATCH_ROWS = 200
# Freeing payload pages is what a prune transaction spends its time on (measured: about 1 ms
# per 100 KB): a batch stops at this much payload, so it holds the writer for ~20 ms at most.
PRUNE_BATCH_PAYLOAD_CHARS = 2 * 1024 * 1024
# A pass runs this often (a tenth of the retention time, within these bounds).
MIN_PASS_INTERVAL_S = 0.2
MAX_PASS_INTERVAL_S = 300.0
# Between two full batches: the writer gets to other work first.
PAUSE_BETWEEN_BATCHES_S = 0.05


class Retention:
    def __init__(
        self, store: Store, images_path: Path, retention_s: float, summary_retention_s: float, metrics: Metrics
    ) -> None:
        self._store = store
        self._images_path = images_path
        self.retention_s = retention_s
        # 0: summaries are kept forever; never shorter than the retention itself.
        self.summary_retention_s = max(summary_retention_s, retention_s) if summary_retention_s else 0.0
        self._metrics = metrics
        self.interval_s = min(MAX_PASS_INTERVAL_S, max(MIN_PASS_INTERVAL_S, retention_s / 10))
        self._summary = f"The result of this request was deleted {retention_s:g} s after it finished (RETENTION_S)."

    async def run(self) -> None:
        """Prune forever; a failing pass (a full disk) is logged and tried again later."""
        while True:
            try:
                pruned = await self.prune_once()
            except Exception as exc:
                log.warning(
                    "retention: pruning failed (%s: %s); trying again in %.0f s",
                    type(exc).__name__,
                    exc,
                    self.interval_s,
                )
                pruned = 0
            # More may be waiting after a batch that pruned something; the next pass says.
            await asyncio.sleep(PAUSE_BETWEEN_BATCHES_S if pruned else self.interval_s)

    async def prune_once(self) -> int:
        """Prune one batch, and delete one batch of old summaries; returns the larger count."""
        pruned = await self._prune_batch()
        forgotten = 0
        if self.summary_retention_s:
            forgotten = await self._store.retention.forget_summaries(
                time.time() - self.summary_retention_s, PRUNE_BATCH_ROWS
            )
            if forgotten:
                self._metrics.forgotten.inc(forgotten)
                log.info("retention: deleted %d request summaries (SUMMARY_RETENTION_S)", forgotten)
        return max(pruned, forgotten)

    async def _prune_batch(self) -> int:
        rows = await self._store.retention.prunable(
            time.time() - self.retention_s, PRUNE_BATCH_ROWS, PRUNE_BATCH_PAYLOAD_CHARS
        )
        if not rows:
            return 0
        files = [self._images_path / name for _, name in rows if name and IMAGE_FILE_NAME.match(name)]
        # A crash while a request's image was written leaves its unfinished copy. The request
        # runs again at the next start and writes over it, unless it ends first (cancelled,
        # expired): then nothing else would ever delete it.
        leftovers = [unfinished_copy(self._images_path / image_file_name(object_id)) for object_id, _ in rows]
        await asyncio.to_thread(_delete, files + leftovers)
        await self._store.retention.prune([object_id for object_id, _ in rows], self._summary)
        self._metrics.pruned.inc(len(rows))
        log.info("retention: pruned %d finished requests (payloads, results, %d local images)", len(rows), len(files))
        return len(rows)


def _delete(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
