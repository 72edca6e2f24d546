"""Nothing is kept forever: past RETENTION_S a finished request keeps a summary, its payload,
image and result go, and under a steady load the database stops growing."""

from __future__ import annotations

import json
import sqlite3

from yarl import URL

from bench.bots import request_message, wait_until
from bench.images import noisy_png_base64
from tests.conftest import SERVICE_KEYS, cancel_action

TELEGRAM = {"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}


def stored(database, object_id: str) -> tuple | None:
    """(status, payload column, result, pruned_at, whether a payload file is on disk)."""
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT status, payload, result, pruned_at FROM requests WHERE object_id = ?", (object_id,)
        ).fetchone()
    payload_file = database.with_name(database.name + ".payloads") / f"{object_id}.json"
    return None if row is None else (*row, payload_file.exists())


def pruned_and_file_gone(database, object_id: str) -> bool:
    """Pruned: the row first, then (just after its commit) the payload file."""
    row = stored(database, object_id)
    return row is not None and row[3] is not None and not row[4]


async def test_a_finished_request_past_retention_keeps_only_its_summary(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], RETENTION_S=1)
    bot = await balancer.connect("telegram")
    image = noisy_png_base64(side=160)  # a payload large enough to be kept in a file
    queued = await bot.submit(
        request_message("automatic1111", "img2img", {"init_images": [image], "prompt": "a fox"}, user_id=4)
    )
    done = await bot.final(queued["object_id"])
    url = URL(done["result"]["content"])
    image_file = balancer.config.images_path / f"{queued['object_id']}.jpg"
    assert (await balancer.client.get(url.path_qs)).status == 200 and image_file.exists()
    status, outline, *_, payload_file = stored(balancer.config.database_path, queued["object_id"])
    # The row holds the payload without its image (the status page reads the prompt there).
    assert payload_file and json.loads(outline) == {"init_images": [None], "prompt": "a fox"}

    await wait_until(lambda: pruned_and_file_gone(balancer.config.database_path, queued["object_id"]), timeout_s=10)
    status, payload, result, _, payload_file = stored(balancer.config.database_path, queued["object_id"])
    assert (status, payload, payload_file) == ("ok", "{}", False)
    assert "deleted 1 s after it finished (RETENTION_S)" in result
    assert not image_file.exists() and (await balancer.client.get(url.path_qs)).status == 404
    # The summary still answers: the request existed, and what became of it.
    fetched = await (await balancer.client.get(f"/api/v1/requests/{queued['object_id']}", headers=TELEGRAM)).json()
    assert fetched["gen_status"] == "ok" and fetched["service_info"]["user_id"] == 4
    assert fetched["result"]["content_type"] == "text" and "RETENTION_S" in fetched["result"]["content"]
    metrics = await (await balancer.client.get("/metrics")).text()
    assert "devoid_pruned_requests_total 1.0" in metrics


async def test_summaries_past_their_own_retention_are_deleted(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")], RETENTION_S=0.2, SUMMARY_RETENTION_S=0.5)
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "brief"}))
    await bot.final(queued["object_id"])
    await wait_until(lambda: stored(balancer.config.database_path, queued["object_id"]) is None, timeout_s=10)
    response = await balancer.client.get(f"/api/v1/requests/{queued['object_id']}", headers=TELEGRAM)
    assert response.status == 404


async def test_an_image_a_crash_left_half_written_goes_with_its_request(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], RETENTION_S=0.5)
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "never finished"}))
    # What a crash while its image was written leaves behind; the request is then cancelled
    # before it runs again, so no later write renames or replaces the copy.
    leftover = balancer.config.images_path / f"{queued['object_id']}.tmp"
    leftover.write_bytes(b"\xff\xd8 half an image")

    await bot.send(cancel_action(queued["object_id"]))
    done = await bot.final(queued["object_id"])
    await wait_until(lambda: stored(balancer.config.database_path, queued["object_id"])[3] is not None, timeout_s=10)

    assert done["result"]["content"] == "cancelled"
    assert not leftover.exists()
    gpu.state.gate.set()


async def test_a_request_still_waiting_is_never_pruned_however_old(start_backend, start_balancer):
    gpu, other_gpu = await start_backend("automatic1111"), await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu, other_gpu], RETENTION_S=0.2)
    bot = await balancer.connect("telegram")
    first = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "first"}))
    waiting = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "still waiting"}))
    # A younger request that finishes is pruned: passes have run past the waiting ones' age.
    younger = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "younger"}))
    await bot.final(younger["object_id"])
    await wait_until(lambda: stored(balancer.config.database_path, younger["object_id"])[3] is not None, timeout_s=10)
    gpu.state.gate.set()
    for queued in (first, waiting):
        done = await bot.final(queued["object_id"])
        assert done["gen_status"] == "ok" and done["payload"]["prompt"] in ("first", "still waiting")
    assert [call.body["prompt"] for call in gpu.state.received] == ["first", "still waiting"]


async def test_under_a_steady_load_the_database_stops_growing(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], RETENTION_S=0.3, MAX_USER_REQUESTS=0)
    bot = await balancer.connect("telegram")
    database = balancer.config.database_path
    image = noisy_png_base64(side=256)  # ~200 KB of base64 per request

    def on_disk() -> int:
        """The database, its WAL and its payload files."""
        files = [*database.parent.glob(database.name + "*"), *database.parent.glob(database.name + ".payloads/*")]
        return sum(path.stat().st_size for path in files if path.is_file())

    sizes = []
    for round_ in range(8):
        ids = [
            (
                await bot.submit(
                    request_message("automatic1111", "img2img", {"init_images": [image], "prompt": f"r{round_} {n}"})
                )
            )["object_id"]
            for n in range(10)
        ]
        for object_id in ids:
            await bot.final(object_id)
        # Past the retention time this round is pruned: its space is free for the next one.
        # (Its payload files go just after the prune's commit.)
        await wait_until(
            lambda ids=ids: all(pruned_and_file_gone(database, object_id) for object_id in ids), timeout_s=10
        )
        sizes.append(on_disk())
    written = 8 * 10 * len(image)
    # Without pruning the files would hold every round (16 MB); with it, what is left is the
    # write-ahead log (reused after each checkpoint, so it stops at ~4 MB) and summaries.
    assert sizes[-1] < written / 3, (sizes, written)
    payload_files = list(database.parent.glob(database.name + ".payloads/*"))
    assert payload_files == [] and database.stat().st_size < written / 50
