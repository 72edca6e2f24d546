"""Result images land in S3 (moto's server over HTTP) as <object_id>.jpg, image/jpeg: with
sync_with_s3 the ok waits for the upload; without, it is sent at once; through an S3 outage
every image arrives, exactly once."""

from __future__ import annotations

import io
import logging

from PIL import Image
from yarl import URL

from app import keys
from bench.bots import request_message, wait_until
from tests.mirror_servers import IMAGE_ENDPOINT


def kandinsky_request(prompt: str, sync: int) -> dict:
    message = request_message("kandinsky", "text2img", {"prompt": prompt})
    message["settings"]["sync_with_s3"] = sync
    return message


def assert_jpeg(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"


async def test_sync_upload_is_in_s3_before_the_ok(start_backend, start_balancer, s3_server):
    balancer = await start_balancer([await start_backend("kandinsky")], SAVE_IMAGES_LOCALLY=0, **s3_server.env())
    bot = await balancer.connect("telegram")

    queued = await bot.submit(kandinsky_request("synced", sync=1))
    done = await bot.final(queued["object_id"])
    stored = await s3_server.objects()  # read right after the ok: it must already be there

    file_name = f"{queued['object_id']}.jpg"
    assert done["result"] == {
        "content_type": "image_url",
        "content": IMAGE_ENDPOINT + file_name,
        "file_name": file_name,
    }
    assert list(stored) == [file_name]
    assert stored[file_name]["content_type"] == "image/jpeg"
    assert_jpeg(stored[file_name]["body"])
    # Local images are off: the spooled copy is gone once uploaded.
    assert list(balancer.config.spool_path.iterdir()) == []


async def test_without_sync_the_ok_is_sent_at_once_and_the_upload_follows(start_backend, start_balancer, s3_server):
    await s3_server.stop()  # the upload cannot finish before the ok
    balancer = await start_balancer(
        [await start_backend("kandinsky")], SAVE_IMAGES_LOCALLY=0, MIRROR_RETRY_MAX_S=0.2, **s3_server.env()
    )
    bot = await balancer.connect("telegram")

    queued = await bot.submit(kandinsky_request("async", sync=0))
    done = await bot.final(queued["object_id"])
    assert done["result"]["content"] == IMAGE_ENDPOINT + f"{queued['object_id']}.jpg"

    mirror = balancer.app[keys.MIRRORS][0]
    assert mirror.health.state in ("starting", "down")
    await s3_server.start()
    await wait_until(lambda: mirror.health.state == "connected" and mirror.health.backlog == 0)
    assert list(await s3_server.objects()) == [f"{queued['object_id']}.jpg"]


async def test_an_s3_outage_loses_no_image_and_uploads_each_once(start_backend, start_balancer, s3_server, caplog):
    caplog.set_level(logging.INFO, logger="app.mirrors.s3")
    balancer = await start_balancer(
        [await start_backend("kandinsky")],
        SAVE_IMAGES_LOCALLY=1,
        S3_SYNC_TIMEOUT_S=0.3,
        MIRROR_RETRY_MAX_S=0.2,
        **s3_server.env(),
    )
    bot = await balancer.connect("telegram")
    await s3_server.stop()

    ids, finals = [], {}
    for index in range(6):
        queued = await bot.submit(kandinsky_request(f"outage {index}", sync=index % 2))
        ids.append(queued["object_id"])
    for object_id in ids:
        finals[object_id] = await bot.final(object_id)
    mirror = balancer.app[keys.MIRRORS][0]
    await wait_until(lambda: mirror.health.state == "down" and mirror.health.backlog == 6)
    assert "Could not connect" in mirror.health.last_error or "Connect" in mirror.health.last_error

    # sync_with_s3=1 past S3_SYNC_TIMEOUT_S: ok with the locally served copy instead.
    for index, object_id in enumerate(ids):
        result = finals[object_id]["result"]
        assert finals[object_id]["gen_status"] == "ok"
        if index % 2:
            url = URL(result["content"])
            assert str(url.with_query(None)) == f"{balancer.config.public_url}/img/{object_id}.jpg"
            response = await balancer.client.get(url.path_qs)
            assert response.status == 200
        else:
            assert result["content"] == IMAGE_ENDPOINT + f"{object_id}.jpg"

    await s3_server.start()
    await wait_until(lambda: mirror.health.backlog == 0 and mirror.health.state == "connected")
    stored = await s3_server.objects()
    assert sorted(stored) == sorted(f"{object_id}.jpg" for object_id in ids)
    assert all(item["content_type"] == "image/jpeg" for item in stored.values())
    uploads = [r.getMessage() for r in caplog.records if "uploaded to S3" in r.getMessage()]
    assert sorted(uploads) == sorted(f"{oid} uploaded to S3 as {oid}.jpg" for oid in ids)
    # Local copies are kept alongside S3.
    assert sorted(p.name for p in balancer.config.images_path.iterdir()) == sorted(stored)


async def test_a_missing_bucket_is_reported_at_start_up_and_nothing_stops(
    start_backend, start_balancer, s3_server, caplog
):
    caplog.set_level(logging.INFO, logger="app.mirrors.outbox")
    balancer = await start_balancer(
        [await start_backend("kandinsky")], **{**s3_server.env(), "S3_BUCKET_NAME": "no-such-bucket"}
    )
    mirror = balancer.app[keys.MIRRORS][0]
    await wait_until(lambda: mirror.health.state == "down")
    assert "404" in mirror.health.last_error or "Not Found" in mirror.health.last_error
    assert any(r.getMessage().startswith("mirror s3 is down (") for r in caplog.records)

    bot = await balancer.connect("telegram")  # the queue carries on
    queued = await bot.submit(kandinsky_request("still served", sync=0))
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
