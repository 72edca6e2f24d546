"""Large payloads (img2img and mix2img images) as files beside the database.

A megabyte committed through SQLite is written twice (WAL, then the checkpoint into the
database file) and costs the writer thread ~5 ms of CPU; its pages are freed again page by
page at pruning. A file is written once, and deleted whole.

Durability is the same as a row's: `write` returns once the file and its directory entry are
fsynced, and only then is the request's row (which says its payload is in a file) committed.
A crash between the two leaves a file no row names; `sweep` deletes those at start-up, before
any request is taken. A file is named after its request's object_id and never rewritten.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from app.domain import json_text
from app.storage.folder_sync import fsync_folder

log = logging.getLogger(__name__)

# A string this long in a payload is an image in practice. The row of a payload kept in a file
# holds the payload without them (its outline): the status page reads prompts from there.
MAX_OUTLINE_STRING_CHARS = 1024
SUFFIX = ".json"
# O_DIRECT writes go by whole blocks from page-aligned memory. JSON may end in whitespace, so a
# payload is padded with spaces to a whole block and reads back the same.
BLOCK_BYTES = 4096
# The aligned buffer is kept between writes up to this size (larger payloads get their own).
KEPT_BUFFER_BYTES = 4 * 1024 * 1024


class PayloadUnreadable(Exception):
    """The file of a committed request's payload is missing or is not JSON."""


def outline(payload: Any) -> Any:
    """`payload` with every string longer than MAX_OUTLINE_STRING_CHARS replaced by None."""
    if isinstance(payload, str):
        return None if len(payload) > MAX_OUTLINE_STRING_CHARS else payload
    if isinstance(payload, dict):
        return {key: outline(value) for key, value in payload.items()}
    if isinstance(payload, list):
        return [outline(value) for value in payload]
    return payload


class PayloadFiles:
    """The folder of payload files of one database (DATABASE_PATH + `.payloads`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # One write at a time. Concurrent fsyncs into one folder contend in the kernel: measured
        # here, four writers spent 2.4x the CPU per megabyte file of one, for no more files per
        # second (one writer already runs at the disk's speed, ~300 files of 1.3 MB/s).
        self._one_writer = asyncio.Lock()
        # Held by the writing thread: a writer cancelled while its thread runs releases the
        # asyncio lock, and the next write must still not share the buffer with it.
        self._buffer_lock = threading.Lock()
        self._buffer: mmap.mmap | None = None
        self._direct = True  # until the filesystem refuses O_DIRECT (some do, with EINVAL)

    @classmethod
    def beside(cls, database_path: Path) -> PayloadFiles:
        return cls(database_path.with_name(database_path.name + ".payloads"))

    def path(self, object_id: str) -> Path:
        return self.folder / f"{object_id}{SUFFIX}"

    async def write(self, object_id: str, payload: Any, payload_json: bytes | None = None) -> int:
        """Store a payload durably; returns the bytes of its JSON. Off the event loop: its
        serialization (unless `payload_json` is given), and a megabyte's write and fsync."""
        async with self._one_writer:
            return await asyncio.to_thread(self._write, self.path(object_id), payload, payload_json)

    def _write(self, path: Path, payload: Any, payload_json: bytes | None) -> int:
        if payload_json is None:
            payload_json = json_text.dumps_bytes(payload)
        # No temporary name: until its row is committed nothing reads the file, and a torn
        # one left by a crash is an orphan the next start deletes.
        with self._buffer_lock:
            if self._direct:
                try:
                    self._write_direct(path, payload_json)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct = False
                    log.info("the payload folder takes no O_DIRECT writes (%s); writing through the page cache", exc)
            if not self._direct:
                _write_buffered(path, payload_json)
        # The directory entry must be on disk too, or power loss could keep the row and
        # lose the file's name.
        fsync_folder(self.folder)
        return len(payload_json)

    def _write_direct(self, path: Path, payload_json: bytes) -> None:
        """Write around the page cache: measured here, a 1.3 MB file costs 0.5 ms of CPU this
        way against 0.9-1.6 ms through the cache (allocating and copying into its pages), and
        one writer reaches ~500 files/s instead of ~350-450."""
        size = len(payload_json)
        padded = -(-size // BLOCK_BYTES) * BLOCK_BYTES
        buffer = self._buffer
        if buffer is None or len(buffer) < padded:
            buffer = mmap.mmap(-1, padded)  # anonymous memory is page-aligned
            if padded <= KEPT_BUFFER_BYTES:
                self._buffer = buffer
        buffer[:size] = payload_json
        buffer[size:padded] = b" " * (padded - size)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            with memoryview(buffer) as view:
                written = 0
                while written < padded:
                    written += os.write(descriptor, view[written:padded])
            os.fsync(descriptor)  # the file's size and blocks, and the disk's write cache
        finally:
            os.close(descriptor)
            if buffer is not self._buffer:
                buffer.close()

    async def read(self, object_id: str) -> dict[str, Any]:
        """The payload of a request whose row says it is in a file. Raises PayloadUnreadable."""
        path = self.path(object_id)
        try:
            return await asyncio.to_thread(_read_json, path)
        except FileNotFoundError:
            raise PayloadUnreadable(
                f"the stored payload of this request is missing (file {path.name} of the payload folder)"
            ) from None
        except (OSError, ValueError) as exc:
            raise PayloadUnreadable(
                f"the stored payload of this request cannot be read (file {path.name}: {exc})"
            ) from None

    async def delete(self, object_ids: Collection[str]) -> None:
        if object_ids:
            await asyncio.to_thread(self._delete, object_ids)

    def _delete(self, object_ids: Collection[str]) -> None:
        for object_id in object_ids:
            self.path(object_id).unlink(missing_ok=True)

    def create_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def stored_ids(self) -> set[str]:
        """The object_ids of every payload file in the folder (blocking: a directory listing)."""
        with os.scandir(self.folder) as entries:
            return {entry.name[: -len(SUFFIX)] for entry in entries if entry.name.endswith(SUFFIX)}

    async def sweep(self, wanted: Collection[str]) -> int:
        """Delete the files whose request does not want them (a crash before the row's commit,
        or after a prune's commit); returns how many. Only before intake starts: a file being
        written for a request not committed yet would look the same."""
        orphans = (await asyncio.to_thread(self.stored_ids)) - set(wanted)
        await self.delete(orphans)
        if orphans:
            log.info("deleted %d payload files that no stored request needs (left by a crash)", len(orphans))
        return len(orphans)


def _write_buffered(path: Path, payload_json: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload_json)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_json(path: Path) -> Any:
    return json_text.loads(path.read_bytes())
