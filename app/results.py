"""Where a finished image goes: a file under IMAGES_PATH served at /img/, or inline base64."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any

from app.jobs import Job

# Only names this server writes are ever served: no path can be smuggled through /img/.
IMAGE_FILE_NAME = re.compile(r"^[0-9a-f]{24}\.jpg$")


def image_file_name(object_id: str) -> str:
    return f"{object_id}.jpg"


class ResultWriter:
    def __init__(self, *, save_locally: bool, images_path: Path, url_prefix: str) -> None:
        self.save_locally = save_locally
        self.images_path = images_path
        self._url_prefix = url_prefix
        if save_locally:
            images_path.mkdir(parents=True, exist_ok=True)

    async def result_for(self, job: Job, jpeg: bytes) -> dict[str, Any]:
        """Store `jpeg` for `job` and return the `result` of its ok message. Safe to call
        twice (the file is replaced atomically)."""
        file_name = image_file_name(job.object_id)
        if self.save_locally:
            await asyncio.to_thread(_write_atomically, self.images_path / file_name, jpeg)
            return {"content_type": "image_url", "content": self._url_prefix + file_name,
                    "file_name": file_name}
        return {"content_type": "base64", "content": base64.b64encode(jpeg).decode("ascii"),
                "file_name": file_name}

    def local_file(self, file_name: str) -> Path | None:
        """The path of a served image, or None if the name is not one of ours or is absent."""
        if not self.save_locally or not IMAGE_FILE_NAME.match(file_name):
            return None
        path = self.images_path / file_name
        return path if path.is_file() else None


def _write_atomically(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated image behind the URL already sent.
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
