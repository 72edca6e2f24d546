"""Where a finished image goes: S3 (by way of the outbox), a file under IMAGES_PATH served at
/img/, or inline base64.

Local image URLs are capabilities: `/img/<object_id>.jpg?key=<key>`, the key an HMAC of the
file name under IMAGE_URL_SECRET. Whoever the bot hands the URL to can fetch it (chat
platforms fetch URLs without headers); without the key nothing is served, so knowing or
guessing an object id is not enough."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.domain.jobs import Job
from app.domain.secrets_match import secret_matches
from app.storage.folder_sync import fsync_folder

# Only names this server writes are ever served: no path can be smuggled through /img/.
IMAGE_FILE_NAME = re.compile(r"^[0-9a-f]{24}\.jpg$")


# Hex characters of HMAC-SHA256 in a key: 128 bits, beyond guessing.
KEY_CHARS = 32


def image_file_name(object_id: str) -> str:
    return f"{object_id}.jpg"


class ImageSecretUnusable(RuntimeError):
    """IMAGE_URL_SECRET is empty and the server's own secret file cannot be made or read."""


def image_url_secret(configured: str, database_path: Path) -> bytes:
    """IMAGE_URL_SECRET, or the server's own: made once at random and kept beside the database
    (owner-only), so the URLs it signed stay valid across restarts."""
    if configured:
        return configured.encode()
    path = database_path.with_name(database_path.name + ".image-url-secret")
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(secrets.token_hex(32))
        return path.read_text().strip().encode()
    except OSError as exc:
        raise ImageSecretUnusable(
            f"the image URL secret {path} cannot be created or read ({exc.strerror}); fix its "
            "permissions or set IMAGE_URL_SECRET"
        ) from None


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
        url_secret: bytes = b"",
    ) -> None:
        self._url_secret = url_secret
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
            await asyncio.to_thread(write_atomically, path, jpeg)
            return StoredImage(
                {"content_type": "image_url", "content": self._s3_url_prefix + file_name, "file_name": file_name},
                upload_document(path, file_name, delete_after=not self.save_locally),
            )
        if self.save_locally:
            await asyncio.to_thread(write_atomically, self.images_path / file_name, jpeg)
            return StoredImage(self._local_result(file_name))
        return StoredImage(_base64_result(file_name, jpeg))

    async def fallback_result(self, job: Job, upload: dict[str, Any]) -> dict[str, Any]:
        """The result to send when S3 is too slow: the local URL, else the image as base64."""
        file_name = image_file_name(job.object_id)
        if self.save_locally:
            return self._local_result(file_name)
        return _base64_result(file_name, await asyncio.to_thread(Path(upload["path"]).read_bytes))

    def image_key(self, file_name: str) -> str:
        """The key that opens /img/<file_name>."""
        return hmac.new(self._url_secret, file_name.encode(), hashlib.sha256).hexdigest()[:KEY_CHARS]

    def local_url_path(self, file_name: str) -> str:
        """The path (and key) of a local image, for this server's own pages."""
        return f"/img/{file_name}?key={self.image_key(file_name)}"

    def _local_result(self, file_name: str) -> dict[str, Any]:
        url = f"{self._url_prefix}{file_name}?key={self.image_key(file_name)}"
        return {"content_type": "image_url", "content": url, "file_name": file_name}

    def local_file(self, file_name: str) -> Path | None:
        """The path of a local image, or None if the name is not one of ours, is absent, or is
        a symlink (only files this server wrote are served)."""
        if not self.save_locally or not IMAGE_FILE_NAME.match(file_name):
            return None
        path = self.images_path / file_name
        return path if path.is_file() and not path.is_symlink() else None

    def served_file(self, file_name: str, key: str) -> Path | None:
        """The image `/img/<file_name>?key=<key>` opens: None without the right key."""
        if not secret_matches(key, self.image_key(file_name)):
            return None
        return self.local_file(file_name)


def upload_document(path: Path, key: str, delete_after: bool) -> dict[str, Any]:
    """The S3 outbox document of one image upload (app/mirrors/s3.py carries it out)."""
    return {"path": str(path), "key": key, "delete_after": delete_after}


def _base64_result(file_name: str, jpeg: bytes) -> dict[str, Any]:
    return {"content_type": "base64", "content": base64.b64encode(jpeg).decode("ascii"), "file_name": file_name}


def unfinished_copy(path: Path) -> Path:
    """Where write_atomically writes `path` before renaming it into place. A crash mid-write
    leaves it behind; retention deletes it with its request."""
    return path.with_suffix(".tmp")


def write_atomically(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated image behind the URL already sent.
    temporary = unfinished_copy(path)
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The new name must be on disk too before the result that points to it is committed: a
    # power loss could otherwise keep the committed `ok` and lose the image's name. ext4 happens
    # to commit the rename with SQLite's next fsync when both share a filesystem; other
    # filesystems, or IMAGES_PATH on a disk of its own, promise nothing without this. It cost
    # 0-0.3 ms of CPU per image here (ext4, 60 KB images, 3 runs of 500).
    fsync_folder(path.parent)
