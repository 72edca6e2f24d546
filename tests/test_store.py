"""The SQLite store: migrations on a fresh and an old database, group commit that keeps every
write, and one bad write that fails alone."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from app.domain.jobs import GenType, JobStatus
from app.mirrors.records import request_record
from app.storage.migrations import MIGRATIONS_DIR, apply_migrations, migration_files
from app.storage.store import connect
from tests.conftest import new_job


async def test_a_fresh_database_gets_every_migration_once(tmp_path, open_store):
    path = tmp_path / "fresh.sqlite3"
    store = await open_store(path)
    await store.close()
    store = await open_store(path)  # a second start applies nothing again
    await store.close()
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert versions == [version for version, _ in migration_files()]


async def test_an_old_database_is_upgraded_and_keeps_its_rows(tmp_path, open_store):
    path = tmp_path / "old.sqlite3"
    store = await open_store(path)
    job = new_job()
    await store.add(job)
    await store.close()

    newer = tmp_path / "migrations"
    newer.mkdir()
    for _, migration in migration_files():
        (newer / migration.name).write_text(migration.read_text())
    (newer / "9999_add_note.sql").write_text("ALTER TABLE requests ADD COLUMN note TEXT NOT NULL DEFAULT '';")
    db = await connect(path)
    try:
        assert await apply_migrations(db, newer) == [9999]
        assert await apply_migrations(db, newer) == []
    finally:
        await db.close()
    with sqlite3.connect(path) as plain:
        assert plain.execute("SELECT object_id, note FROM requests").fetchall() == [(job.object_id, "")]


async def test_a_failing_migration_leaves_no_half_built_schema(tmp_path):
    broken = tmp_path / "migrations"
    broken.mkdir()
    (broken / "0001_broken.sql").write_text("CREATE TABLE a (x INTEGER);\nCREATE TABLE oops (;")
    db = await connect(tmp_path / "broken.sqlite3")
    try:
        with pytest.raises(sqlite3.OperationalError):
            await apply_migrations(db, broken)
        async with db.execute("SELECT name FROM sqlite_master WHERE name = 'a'") as cursor:
            assert await cursor.fetchall() == []
    finally:
        await db.close()


async def test_concurrent_writes_are_grouped_and_all_committed(tmp_path, open_store):
    store = await open_store(tmp_path / "busy.sqlite3")
    jobs = [new_job() for _ in range(500)]
    await asyncio.gather(*(store.add(job) for job in jobs))
    commits = store.commits
    await store.close()
    with sqlite3.connect(tmp_path / "busy.sqlite3") as db:
        stored = {row[0] for row in db.execute("SELECT object_id FROM requests")}
    assert stored == {job.object_id for job in jobs}
    assert commits < 50  # 500 rows, grouped into few transactions


@pytest.mark.parametrize("mirrored", [False, True], ids=["alone", "with its MongoDB records"])
async def test_a_burst_stored_together_reads_back_request_for_request(tmp_path, mirrored, open_store):
    # Requests committed together go in as few multi-row INSERTs: no field may land in a
    # neighbour's row, whatever the burst's size (299 = 128 + 128 + 32 + 8 + 2 + 1 rows).
    # Mirrored, each request's record for MongoDB is queued with it, in the same order.
    store = await open_store(tmp_path / "burst.sqlite3", record_of=request_record if mirrored else None)
    jobs = [
        new_job(
            service=f"bot{number % 3}",
            premium=number % 4 == 0,
            settings={"premium": int(number % 4 == 0)},
            service_info={"user_id": number, "chat_id": -number},
            payload={"prompt": f"prompt {number}", "steps": 20 + number % 30},
            channel="http" if number % 5 == 0 else "ws",
            request_key=f'"key-{number}"' if number % 7 == 0 else None,
        )
        for number in range(299)
    ]
    for number, job in enumerate(jobs):
        job.cost_units = 1000.0 + number
    commits_before = store.commits
    await asyncio.gather(*(store.add(job) for job in jobs))
    # In a few transactions: none failed and had its requests written again one by one.
    assert store.commits - commits_before < 10
    for job in jobs:
        stored = await store.reads.get(job.object_id)
        assert stored is not None
        assert (
            stored.service,
            stored.premium,
            stored.settings,
            stored.service_info,
            stored.payload,
            stored.channel,
            stored.request_key,
            stored.cost_units,
        ) == (
            job.service,
            job.premium,
            job.settings,
            job.service_info,
            job.payload,
            job.channel,
            job.request_key,
            job.cost_units,
        )
    await store.close()
    if mirrored:
        with sqlite3.connect(tmp_path / "burst.sqlite3") as db:
            queued = [
                json.loads(document)["object_id"]
                for (document,) in db.execute("SELECT document FROM outbox ORDER BY id")
            ]
        assert queued == [job.object_id for job in jobs]


async def test_one_bad_write_fails_alone(tmp_path, open_store):
    store = await open_store(tmp_path / "dup.sqlite3")
    existing = new_job()
    await store.add(existing)
    others = [new_job() for _ in range(5)]
    duplicate = new_job(object_id=existing.object_id)
    results = await asyncio.gather(
        *(store.add(j) for j in [*others[:2], duplicate, *others[2:]]), return_exceptions=True
    )
    assert [type(r).__name__ for r in results] == ["NoneType"] * 2 + ["IntegrityError"] + ["NoneType"] * 3
    assert len((await store.reads.queued_page(0, 10**9, 100))[0]) == 6
    await store.close()


async def test_a_bad_write_in_a_burst_fails_alone_without_the_rest_written_one_by_one(tmp_path, open_store):
    store = await open_store(tmp_path / "dup.sqlite3")
    existing = new_job()
    await store.add(existing)
    burst = [new_job() for _ in range(400)]
    burst[250] = new_job(object_id=existing.object_id)
    commits_before = store.commits
    results = await asyncio.gather(*(store.add(job) for job in burst), return_exceptions=True)
    assert [index for index, result in enumerate(results) if result is not None] == [250]
    assert isinstance(results[250], sqlite3.IntegrityError)
    assert len((await store.reads.queued_page(0, 10**9, 1000))[0]) == 400  # the 399 and the first
    # The failed transaction's other writes are retried in halves: a few transactions, not
    # one per write (each with its fsync, while every other write waits).
    assert store.commits - commits_before < 40


async def test_a_health_check_right_after_a_commit_does_not_wait_for_the_writes_under_way(tmp_path, open_store):
    store = await open_store(tmp_path / "busy.sqlite3")
    await store.add(new_job())
    commits_before = store.commits
    burst = [store.submit_add(new_job()) for _ in range(2000)]
    await store.check_writable(timeout_s=10)
    # The database committed a moment ago: that answers it, with no transaction of its own
    # and none of the burst written.
    assert store.commits == commits_before
    assert sum(commit.done() for commit in burst) == 0
    await asyncio.gather(*burst)


async def test_a_health_check_after_a_failed_write_commits_a_heartbeat_of_its_own(tmp_path, open_store):
    store = await open_store(tmp_path / "dup.sqlite3")
    existing = new_job()
    await store.add(existing)
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(new_job(object_id=existing.object_id))  # the last transaction failed
    asked_at = time.time()
    await store.check_writable(timeout_s=10)
    with sqlite3.connect(tmp_path / "dup.sqlite3") as db:
        [(heartbeat_at,)] = db.execute("SELECT at FROM heartbeat").fetchall()
    assert heartbeat_at >= asked_at


async def test_a_health_check_during_a_burst_is_committed_first_and_alone(tmp_path, open_store):
    store = await open_store(tmp_path / "busy.sqlite3")
    burst = [store.submit_add(new_job()) for _ in range(2000)]
    await store.check_writable(timeout_s=10)
    # Nothing was being written when it came: it went ahead of the whole burst, in a
    # transaction of its own rather than at the head of a batch of the burst's writes.
    assert sum(commit.done() for commit in burst) == 0
    await asyncio.gather(*burst)


async def test_the_job_life_cycle_is_recorded(tmp_path, open_store):
    store = await open_store(tmp_path / "life.sqlite3")
    job = new_job(service="discord")
    job.cost_units = 4.0e6
    await store.add(job)
    await store.claim(job, "gpu-1")
    assert (await store.reads.get(job.object_id)).status is JobStatus.GENERATING
    assert await store.requeue_interrupted() == 1
    [requeued], _ = await store.reads.queued_page(0, 10**9, 100)
    # A restart is not the request's failure: counted apart from its attempts.
    assert (requeued.object_id, requeued.attempts, requeued.interruptions) == (job.object_id, 0, 1)
    job = requeued

    await store.claim(job, "gpu-2")
    job.status, job.result = JobStatus.OK, {"content_type": "base64", "content": "eA=="}
    await store.finish(job, generation_s=1.5)
    assert [j.object_id for j in await store.reads.owed_finals("discord")] == [job.object_id]
    assert await store.reads.owed_finals("telegram") == []
    await store.mark_delivered([job])
    await store.mark_delivered([job])  # safe twice
    stored = await store.reads.get(job.object_id)
    assert (stored.status, stored.attempts, stored.backend) == (JobStatus.OK, 1, "gpu-2")
    assert await store.reads.owed_finals("discord") == []
    # Its stored cost, not its payload, is what a restart learns the speed from.
    assert await store.reads.recent_successes("gpu-2", 5) == [(4.0e6, GenType.TEXT2IMG, None, 1.5)]
    assert await store.reads.recent_successes("gpu-1", 5) == []
    await store.close()


def test_migration_files_are_numbered_without_gaps():
    versions = [version for version, _ in migration_files(MIGRATIONS_DIR)]
    assert versions == list(range(1, len(versions) + 1))


async def test_a_database_from_the_first_release_upgrades_and_its_queue_resumes(tmp_path, open_store):
    first_release = tmp_path / "first"
    first_release.mkdir()
    [(_, first)] = migration_files()[:1]
    (first_release / first.name).write_text(first.read_text())
    path = tmp_path / "old.sqlite3"
    db = await connect(path)
    try:
        await apply_migrations(db, first_release)
        await db.execute(
            "INSERT INTO requests (object_id, service, executor, gen_type, payload, status, created_at)"
            " VALUES ('6b0000000000000000000001', 'telegram', 'kandinsky', 'text2img',"
            " '{\"prompt\": \"old\"}', 'generating', 1.0)"
        )
    finally:
        await db.close()

    store = await open_store(path)
    try:
        assert await store.requeue_interrupted() == 1
        [job], _ = await store.reads.queued_page(0, 10**9, 100)
        assert (job.object_id, job.payload, job.channel, job.attempts) == (
            "6b0000000000000000000001",
            {"prompt": "old"},
            "ws",
            0,
        )
        assert job.revision == 1  # the requeue was the record's first change since the upgrade
    finally:
        await store.close()


async def test_a_large_payload_is_kept_in_a_file_and_read_back_as_sent(tmp_path, open_store):
    path = tmp_path / "big.sqlite3"
    store = await open_store(path)
    image = "iVBORw0KGgo" + "A" * 300_001  # not a multiple of the 4 KB block it is written in
    job = new_job(gen_type=GenType.IMG2IMG, payload={"prompt": "a fox", "init_images": [image], "n": 1.5})
    small = new_job(payload={"prompt": "small"})
    await store.add(job)
    await store.add(small)
    assert [file.name for file in (tmp_path / "big.sqlite3.payloads").iterdir()] == [f"{job.object_id}.json"]
    assert await store.reads.load_payload(job.object_id) == job.payload
    fetched = await store.reads.get(job.object_id)
    assert fetched is not None and fetched.payload == job.payload
    # The row keeps the rest of the payload: the status page shows the prompt.
    assert await store.reads.prompts_of([job.object_id], 100) == {job.object_id: "a fox"}
    await store.close()
