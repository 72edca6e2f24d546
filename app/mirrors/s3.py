"""Result images in S3 (aioboto3), uploaded from a file so large images are streamed.

The image file is written (under IMAGES_PATH, or SPOOL_PATH when local images are off)
before the request's final status and its upload row are committed together; the worker
uploads it as `<object_id>.jpg` with Content-Type image/jpeg and, for spooled files,
deletes the file afterwards. Uploading the same key again replaces the object, so a retry
after a crash never makes a second copy.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Config
from app.mirrors.outbox import OutboxWorker
from app.storage.outbox_rows import OutboxItem
from app.storage.store import Store

if TYPE_CHECKING:
    from botocore.config import Config as BotoConfig

log = logging.getLogger(__name__)

CONTENT_TYPE = "image/jpeg"
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60


def client_config() -> BotoConfig:
    # Imported here: botocore takes about 0.4 s to import, and most servers never use S3.
    from botocore.config import Config as BotoConfig

    # The outbox retries with its own backoff; botocore's retries would only hide outages.
    return BotoConfig(
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retries={"max_attempts": 1, "mode": "standard"}
    )


def open_client(config: Config) -> Any:
    """aioboto3's S3 client for the configured server, as an async context manager."""
    import aioboto3

    return aioboto3.Session().client(
        "s3",
        endpoint_url=config.s3_endpoint,
        region_name=config.s3_region,
        aws_access_key_id=config.s3_access_key,
        aws_secret_access_key=config.s3_secret_key,
        config=client_config(),
    )


class S3Mirror(OutboxWorker):
    target = "s3"

    def __init__(self, store: Store, config: Config, client: Any) -> None:
        super().__init__(store, config.mirror_retry_max_s)
        self._client = client
        self._bucket = config.s3_bucket_name
        self._waiters: dict[str, asyncio.Future[None]] = {}

    async def check(self) -> None:
        # Also tells a missing bucket apart from a missing server.
        await self._client.head_bucket(Bucket=self._bucket)

    def expect(self, object_id: str) -> asyncio.Future[None]:
        """A future resolved when `object_id`'s image is in S3. Take it before committing the
        upload row, so a fast upload cannot be missed."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[object_id] = future
        return future

    def forget(self, object_id: str) -> None:
        self._waiters.pop(object_id, None)

    async def deliver(self, items: list[OutboxItem], done: list[int]) -> None:
        for item in items:
            path = Path(item.document["path"])
            if not path.exists():
                # Nothing can bring it back; say so loudly and move on.
                log.error("%s: image %s is gone before its S3 upload; not uploaded", item.object_id, path)
                done.append(item.id)
                continue
            await self._client.upload_file(
                str(path), self._bucket, item.document["key"], ExtraArgs={"ContentType": CONTENT_TYPE}
            )
            if item.document.get("delete_after"):
                path.unlink(missing_ok=True)
            done.append(item.id)
            log.info("%s uploaded to S3 as %s", item.object_id, item.document["key"])
            waiter = self._waiters.pop(item.object_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
