"""Where a finished image goes: S3 (by way of the outbox), a file under IMAGES_PATH served at
/img/, or inline base64."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.domain.jobs import Job

# Only names this server writes are ever served: no path can be smuggled through /img/.
IMAGE_FILE_NAME = re.compile(r"^[0-9a-f]{24}\.jpg$")


def image_file_name(object_id: str) -> str:
    return f"{object_id}.jpg"


@dataclass(frozen=True)
class StoredImage:
    result: dict[str, Any]  # the `result` of the ok message
    upload: dict[str, Any] | None = None  # the S3 outbox document, when S3 is on


class ResultWriter:
    def __init__(
        self,
        *,
        save_locally: bool,
        images_path: Path,
        url_prefix: str,
        s3_url_prefix: str | None = None,
        spool_path: Path | None = None,
    ) -> None:
        self.save_locally = save_locally
        self.images_path = images_path
        self._url_prefix = url_prefix
        self._s3_url_prefix = s3_url_prefix
        self._spool_path = spool_path
        if save_locally:
            images_path.mkdir(parents=True, exist_ok=True)
        if s3_url_prefix is not None and not save_locally:
            if spool_path is None:
                raise ValueError("with S3 and no local images, images need a spool folder (SPOOL_PATH)")
            spool_path.mkdir(parents=True, exist_ok=True)

    async def store_image(self, job: Job, jpeg: bytes) -> StoredImage:
        """Write `jpeg` for `job` and say what its ok message carries. Safe to call twice
        (files are replaced atomically)."""
        file_name = image_file_name(job.object_id)
        if self._s3_url_prefix is not None:
            # The file is the upload's source: it must be on disk before the upload row is
            # committed. Kept under IMAGES_PATH when local images are on, else spooled.
            folder = self.images_path if self.save_locally else self._spool_path
            assert folder is not None  # checked in __init__
            path = folder / file_name
            await asyncio.to_thread(_write_atomically, path, jpeg)
            return StoredImage(
                {"content_type": "image_url", "content": self._s3_url_prefix + file_name, "file_name": file_name},
                upload_document(path, file_name, delete_after=not self.save_locally),
            )
        if self.save_locally:
            await asyncio.to_thread(_write_atomically, self.images_path / file_name, jpeg)
            return StoredImage(self._local_result(file_name))
        return StoredImage(_base64_result(file_name, jpeg))

    async def fallback_result(self, job: Job, upload: dict[str, Any]) -> dict[str, Any]:
        """The result to send when S3 is too slow: the local URL, else the image as base64."""
        file_name = image_file_name(job.object_id)
        if self.save_locally:
            return self._local_result(file_name)
        return _base64_result(file_name, await asyncio.to_thread(Path(upload["path"]).read_bytes))

    def _local_result(self, file_name: str) -> dict[str, Any]:
        return {"content_type": "image_url", "content": self._url_prefix + file_name, "file_name": file_name}

    def local_file(self, file_name: str) -> Path | None:
        """The path of a served image, or None if the name is not one of ours or is absent."""
        if not self.save_locally or not IMAGE_FILE_NAME.match(file_name):
            return None
        path = self.images_path / file_name
        return path if path.is_file() else None


def upload_document(path: Path, key: str, delete_after: bool) -> dict[str, Any]:
    """The S3 outbox document of one image upload (app/mirrors/s3.py carries it out)."""
    return {"path": str(path), "key": key, "delete_after": delete_after}


def _base64_result(file_name: str, jpeg: bytes) -> dict[str, Any]:
    return {"content_type": "base64", "content": base64.b64encode(jpeg).decode("ascii"), "file_name": file_name}


def _write_atomically(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated image behind the URL already sent.
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
