"""Every request's record reaches MongoDB (the real PyMongo driver against the wire-protocol
test server, or a real MongoDB at TEST_MONGODB_URI) with `_id` = ObjectId(object_id) and its
final status; through an outage nothing is lost, and no record ever moves backwards."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import ObjectId

from app import keys
from app.config import Config
from app.domain.ids import new_object_id
from app.domain.jobs import JobStatus
from app.mirrors.mongodb import MongoMirror, open_client
from app.mirrors.records import request_record
from app.storage.store import Store
from bench.bots import request_message, wait_until
from bench.images import noisy_png_base64
from tests.conftest import base_env, database_refusing_writes, new_job


def mongo_mirror(balancer) -> MongoMirror:
    return next(m for m in balancer.app[keys.MIRRORS] if m.target == "mongodb")


async def test_each_request_has_a_record_with_its_final_status(start_backend, start_balancer, mongo_server):
    balancer = await start_balancer([await start_backend("automatic1111", name="gpu-a")], **mongo_server.env())
    bot = await balancer.connect("discord")
    image = noisy_png_base64()
    queued = await bot.submit(
        request_message("automatic1111", "img2img", {"prompt": "winter", "init_images": [image], "steps": 5})
    )
    await bot.final(queued["object_id"])

    async def delivered_record() -> dict | None:
        record = (await mongo_server.records()).get(queued["object_id"])
        return record if record and record["delivered_at"] else None

    # The last version (delivered) is committed just after the ok is sent.
    await wait_until(delivered_record)
    record = await delivered_record()
    assert record["_id"] == ObjectId(queued["object_id"])
    assert (record["gen_status"], record["service"], record["backend"], record["attempts"]) == (
        "ok",
        "discord",
        "gpu-a",
        1,
    )
    assert record["result"]["file_name"] == f"{queued['object_id']}.jpg"
    assert record["payload"]["prompt"] == "winter"
    # The input image is summarized, not copied.
    assert record["payload"]["init_images"][0]["chars"] == len(image)
    assert len(record["payload"]["init_images"][0]["sha256"]) == 64
    for name in ("queued_at", "generating_at", "finished_at", "delivered_at"):
        assert isinstance(record[name], datetime.datetime), name
    assert record["queued_at"] <= record["generating_at"] <= record["finished_at"]
    assert record["generation_s"] >= 0 and record["revision"] >= 4


async def test_a_mongodb_outage_loses_nothing_and_nothing_regresses(
    start_backend, start_balancer, mongo_server, caplog
):
    if not mongo_server.stoppable:
        pytest.skip("a real MongoDB cannot be stopped from the test")
    caplog.set_level(logging.INFO, logger="app.mirrors.outbox")
    await mongo_server.stop()  # down before the balancer starts: start-up must not care
    balancer = await start_balancer([await start_backend("kandinsky")], MIRROR_RETRY_MAX_S=0.2, **mongo_server.env())
    bot = await balancer.connect("telegram")
    ids = []
    for index in range(5):
        queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": f"p{index}"}))
        ids.append(queued["object_id"])
    for object_id in ids:
        assert (await bot.final(object_id))["gen_status"] == "ok"  # clients carry on
    mirror = mongo_mirror(balancer)
    await wait_until(lambda: mirror.health.state == "down")
    assert mirror.health.backlog > 0

    await mongo_server.start()
    await wait_until(lambda: mirror.health.state == "connected" and mirror.health.backlog == 0)
    records = await mongo_server.records()
    assert sorted(records) == sorted(ids)
    store = balancer.app[keys.STORE]
    for object_id in ids:
        stored = await store.reads.get(object_id)
        assert records[object_id]["gen_status"] == "ok"
        assert records[object_id]["revision"] == stored.revision  # the newest version won
        assert records[object_id]["delivered_at"] is not None
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("mirror mongodb is down (") for m in logged)
    assert any(m.startswith("mirror mongodb is connected") for m in logged)


@contextlib.asynccontextmanager
async def mirror_on_a_store(tmp_path, mongo_server) -> AsyncIterator[tuple[Store, MongoMirror, Any]]:
    """A store with record mirroring on, and its (not yet started) MongoDB mirror and client."""
    config = Config.from_env(base_env(tmp_path, 8080, **mongo_server.env()))
    store = await Store.open(tmp_path / "mirrored.sqlite3", record_of=request_record)
    client = open_client(config)
    mirror = MongoMirror(store, config, client)
    try:
        yield store, mirror, client[config.mongodb_db]
    finally:
        await mirror.stop()
        await client.close()
        await store.close()


async def test_an_older_version_written_late_does_not_overwrite_a_newer_one(tmp_path, mongo_server):
    async with mirror_on_a_store(tmp_path, mongo_server) as (store, mirror, _):
        job = new_job()
        await store.add(job)
        stale = await store.outbox.batch("mongodb", 10)  # revision 1: queued
        await store.claim(job, "gpu")
        job.status, job.result = JobStatus.OK, {"content_type": "text", "content": "x"}
        await store.finish(job, 1.0)  # revision 3: ok
        mirror.start()
        await wait_until(lambda: mirror.health.state == "connected" and mirror.health.backlog == 0)
        # A retry of the first write arrives after the last one.
        done: list[int] = []
        await mirror.deliver(stale, done)
        assert done == [stale[0].id]  # accepted as "already newer", not an error
        record = (await mongo_server.records())[job.object_id]
        assert (record["gen_status"], record["revision"]) == ("ok", 3)


async def test_records_keep_the_original_products_document_shape(start_backend, start_balancer, mongo_server):
    """Dashboards written against the original product's collection query these names."""
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([kandinsky], **mongo_server.env())
    bot = await balancer.connect("discord")
    ok = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "a fox"}))
    await bot.final(ok["object_id"])
    kandinsky.state.fail_status = 422  # the backend refuses the next request: an error final
    failed = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "refused"}))
    await bot.final(failed["object_id"])

    async def both_final() -> dict | None:
        records = await mongo_server.records()
        wanted = [records.get(ok["object_id"]), records.get(failed["object_id"])]
        return records if all(r and r["gen_status"] in ("ok", "error") for r in wanted) else None

    await wait_until(both_final)
    records = await both_final()
    original_fields = {
        "object_id",
        "service",
        "message_type",
        "executor",
        "gen_type",
        "gen_status",
        "result",
        "settings",
        "service_info",
        "payload",
    }
    for object_id in (ok["object_id"], failed["object_id"]):
        assert original_fields <= set(records[object_id])
        assert records[object_id]["message_type"] == "response"
        assert records[object_id]["object_id"] == object_id
        assert records[object_id]["service_info"] == {"user_id": 1, "chat_id": 10, "message_id": 20}
    done, error = records[ok["object_id"]], records[failed["object_id"]]
    assert done["gen_status"] == "ok"
    assert set(done["result"]) == {"content_type", "content", "file_name"}
    assert error["gen_status"] == "error"
    assert set(error["result"]) == {"content_type", "content"} and error["result"]["content_type"] == "text"
    assert "422" in error["result"]["content"]


async def test_a_waiting_record_has_a_null_result(tmp_path, mongo_server):
    async with mirror_on_a_store(tmp_path, mongo_server) as (store, mirror, _):
        job = new_job()
        await store.add(job)
        mirror.start()
        await wait_until(lambda: mirror.health.state == "connected" and mirror.health.backlog == 0)
        record = (await mongo_server.records())[job.object_id]
        assert (record["gen_status"], record["result"]) == ("queued", None)


async def test_records_of_the_earlier_release_are_upgraded_at_start(tmp_path, mongo_server):
    """Release 0.3.0 wrote `status`; such records get `gen_status` when the mirror starts."""
    old_id = new_object_id()
    async with mirror_on_a_store(tmp_path, mongo_server) as (_, mirror, database):
        await database["requests"].insert_one(
            {
                "_id": ObjectId(old_id),
                "object_id": old_id,
                "service": "telegram",
                "executor": "kandinsky",
                "gen_type": "text2img",
                "status": "ok",
                "revision": 4,
                "result": {"content_type": "image_url", "content": "http://x/a.jpg", "file_name": f"{old_id}.jpg"},
            }
        )
        mirror.start()
        await wait_until(lambda: mirror.health.state == "connected")
        record = (await mongo_server.records())[old_id]
        assert (record["gen_status"], record["message_type"], record["status"]) == ("ok", "response", "ok")
        assert await database["requests"].count_documents({"gen_status": "ok"}) == 1


async def test_the_mirror_outlives_a_database_that_refuses_writes(start_backend, start_balancer, mongo_server):
    """MongoDB comes back while SQLite refuses writes: the mirror cannot record what it
    delivered, keeps trying, and finishes the backlog once the database takes writes again."""
    if not mongo_server.stoppable:
        pytest.skip("a real MongoDB cannot be stopped from the test")
    await mongo_server.stop()
    balancer = await start_balancer([await start_backend("kandinsky")], MIRROR_RETRY_MAX_S=0.2, **mongo_server.env())
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "p"}))
    await bot.final(queued["object_id"])
    mirror = mongo_mirror(balancer)
    await wait_until(lambda: mirror.health.state == "down")

    with database_refusing_writes(balancer.config.database_path):
        await mongo_server.start()
        await wait_until(mongo_has(mongo_server, queued["object_id"]))  # delivered, not recorded
        await asyncio.sleep(6)  # past SQLite's busy timeout: the outbox update fails at least once
    await wait_until(lambda: mirror.health.state == "connected" and mirror.health.backlog == 0, timeout_s=30)
    assert (await mongo_server.records())[queued["object_id"]]["gen_status"] == "ok"


def mongo_has(mongo_server, object_id: str):
    async def check() -> bool:
        return object_id in await mongo_server.records()

    return check


async def test_retention_prunes_the_mongodb_record_too_and_then_deletes_it(start_backend, start_balancer, mongo_server):
    # An operator who sets RETENTION_S expects prompts and image links gone everywhere, not
    # only in SQLite.
    balancer = await start_balancer(
        [await start_backend("automatic1111")], RETENTION_S=0.5, SUMMARY_RETENTION_S=2, **mongo_server.env()
    )
    bot = await balancer.connect("discord")
    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "a private wish"}))
    await bot.final(queued["object_id"])

    async def record() -> dict | None:
        return (await mongo_server.records()).get(queued["object_id"])

    async def pruned() -> bool:
        found = await record()
        return found is not None and found["payload"] == {}

    await wait_until(pruned, timeout_s=10)
    found = await record()
    assert found["gen_status"] == "ok" and found["service"] == "discord"
    assert found["result"]["content_type"] == "text" and "RETENTION_S" in found["result"]["content"]
    assert "private wish" not in str(found) and isinstance(found["pruned_at"], datetime.datetime)

    async def deleted() -> bool:
        return await record() is None

    await wait_until(deleted, timeout_s=10)
