"""The balancer is killed with SIGKILL while requests are queued, generating and finished but
undelivered; restarted on the same database, it brings every accepted request to `ok`."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest

from bench.bots import Bot, request_message, wait_until
from bench.images import noisy_png_base64
from bench.processes import ServerProcess
from tests.conftest import SERVICE_KEYS, base_env, write_executors


def rows_by_status(database_path) -> dict[str, list[tuple]]:
    """Read the real SQLite file the way an operator would, with the stdlib driver."""
    with sqlite3.connect(database_path) as db:
        rows = db.execute("SELECT object_id, status, delivered_at, attempts FROM requests").fetchall()
    grouped: dict[str, list[tuple]] = {}
    for row in rows:
        grouped.setdefault(row[1], []).append(row)
    return grouped


@pytest.fixture
async def server_factory(tmp_path, unused_tcp_port_factory):
    started: list[ServerProcess] = []
    port = unused_tcp_port_factory()

    def make(**env) -> ServerProcess:
        server = ServerProcess(base_env(tmp_path, port, **env), tmp_path / "server.log")
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


async def connect(session: aiohttp.ClientSession, server: ServerProcess, service: str) -> Bot:
    ws = await session.ws_connect(
        f"{server.base_url}/ws/{service}", headers={"authorization": SERVICE_KEYS[service], "service": service}
    )
    return Bot(ws)


async def test_sigkill_with_requests_queued_generating_and_undelivered_loses_none(
    tmp_path, start_backend, server_factory
):
    a1111 = await start_backend("automatic1111")
    kandinsky = await start_backend("kandinsky")
    write_executors(tmp_path, [a1111, kandinsky])
    database_path = tmp_path / "data" / "devoid.sqlite3"
    # The A1111 GPU holds its first job: that one is `generating` when the kill comes,
    # the other A1111 jobs wait in the queue. Kandinsky works only once the bot has left.
    a1111.state.gate.clear()
    kandinsky.state.gate.clear()

    server = server_factory()
    await server.start()
    accepted: list[str] = []
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server, "telegram")
        for index in range(6):
            for executor in ("automatic1111", "kandinsky"):
                queued = await bot.submit(request_message(executor, "text2img", {"prompt": f"{executor} {index}"}))
                assert queued["gen_status"] == "queued"
                accepted.append(queued["object_id"])
        await bot.close()  # the bot goes away: Kandinsky results now have nowhere to go
        kandinsky.state.gate.set()

        await wait_until(lambda: len(rows_by_status(database_path).get("ok", [])) == 6)
        await wait_until(lambda: a1111.state.running == 1)
        before = rows_by_status(database_path)
        assert len(before["generating"]) == 1 and len(before["queued"]) == 5
        assert all(delivered_at is None for _, _, delivered_at, _ in before["ok"])

        server.kill()
        assert await server.wait() == -9

        a1111.state.gate.set()
        restarted = server_factory()
        await restarted.start()
        bot = await connect(session, restarted, "telegram")
        finals = {}
        while len(finals) < len(accepted):
            message = await bot.next_message(lambda m: m.get("gen_status") in ("ok", "error"))
            finals[message["object_id"]] = message
        await bot.close()

    assert set(finals) == set(accepted)
    assert {m["gen_status"] for m in finals.values()} == {"ok"}
    # Marked delivered right after the send: give the last mark its commit.
    await wait_until(lambda: all(row[2] for row in rows_by_status(database_path)["ok"]))
    after = rows_by_status(database_path)
    assert len(after["ok"]) == 12 and set(after) == {"ok"}
    # The job that was generating at the kill ran again: the restart is counted as an
    # interruption, not as a failed attempt (it must not use up MAX_ATTEMPTS).
    interrupted_id = before["generating"][0][0]
    assert [attempts for oid, _, _, attempts in after["ok"] if oid == interrupted_id] == [1]
    with sqlite3.connect(database_path) as db:
        assert db.execute("SELECT interruptions FROM requests WHERE object_id = ?", (interrupted_id,)).fetchone() == (
            1,
        )
    assert "1 were interrupted by a restart" in restarted.log()


async def test_a_result_finished_while_the_service_was_away_is_delivered_on_reconnect(start_backend, start_balancer):
    kandinsky = await start_backend("kandinsky")
    kandinsky.state.gate.clear()
    balancer = await start_balancer([kandinsky])
    bot = await balancer.connect("discord")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "later"}))
    await bot.close()

    kandinsky.state.gate.set()
    await wait_until(lambda: kandinsky.state.received and kandinsky.state.received[0].finished_at)
    other_service = await balancer.connect("telegram")  # another service must not get it
    back = await balancer.connect("discord")
    done = await back.final(queued["object_id"])

    assert done["gen_status"] == "ok" and done["payload"] == {"prompt": "later"}
    assert not other_service.received


async def test_sigkill_while_a_failed_job_waits_to_retry_loses_nothing(tmp_path, start_backend, server_factory):
    gpu = await start_backend("automatic1111", name="flaky")
    gpu.state.fail_status = 503
    write_executors(tmp_path, [gpu])
    database_path = tmp_path / "data" / "devoid.sqlite3"
    # A long backoff: the kill lands while the job waits for its second attempt.
    server = server_factory(RETRY_BACKOFF_S="60", BREAKER_FAILURES="5")
    await server.start()
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server, "telegram")
        queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "retry me"}))
        await bot.next_message(lambda m: m.get("info_type") == "retrying")
        [(object_id, status, _, attempts)] = rows_by_status(database_path)["queued"]
        assert (object_id, attempts) == (queued["object_id"], 1)
        server.kill()
        await server.wait()

        gpu.state.fail_status = None
        restarted = server_factory()
        await restarted.start()
        bot = await connect(session, restarted, "telegram")
        done = await bot.final(queued["object_id"])
    assert done["gen_status"] == "ok"
    assert [row[3] for row in rows_by_status(database_path)["ok"]] == [2]


async def test_sigkill_with_mirror_work_pending_drains_it_after_restart(
    tmp_path, start_backend, server_factory, s3_server, mongo_server
):
    if not mongo_server.stoppable:
        pytest.skip("a real MongoDB cannot be stopped from the test")
    kandinsky = await start_backend("kandinsky")
    write_executors(tmp_path, [kandinsky])
    await s3_server.stop()
    await mongo_server.stop()
    env = {**s3_server.env(), **mongo_server.env(), "SAVE_IMAGES_LOCALLY": "0", "MIRROR_RETRY_MAX_S": "0.2"}
    server = server_factory(**env)
    await server.start()
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server, "telegram")
        ids = []
        for index in range(4):
            queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": f"m{index}"}))
            ids.append(queued["object_id"])
        for object_id in ids:
            assert (await bot.final(object_id))["gen_status"] == "ok"
        database_path = tmp_path / "data" / "devoid.sqlite3"
        with sqlite3.connect(database_path) as db:
            pending = dict(db.execute("SELECT target, count(*) FROM outbox GROUP BY target").fetchall())
        assert pending["s3"] == 4 and pending["mongodb"] >= 4
        server.kill()
        await server.wait()

    await s3_server.start()
    await mongo_server.start()
    restarted = server_factory(**env)
    await restarted.start()
    try:

        def outbox_empty() -> bool:
            with sqlite3.connect(database_path) as db:
                return db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0

        await wait_until(outbox_empty)
    finally:
        await restarted.stop()
    assert sorted(await s3_server.objects()) == sorted(f"{oid}.jpg" for oid in ids)
    records = await mongo_server.records()
    assert sorted(records) == sorted(ids)
    assert {record["gen_status"] for record in records.values()} == {"ok"}
    assert not list((tmp_path / "spool").iterdir())


async def test_every_request_acknowledged_before_a_sigkill_is_in_the_database(tmp_path, start_backend, server_factory):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()  # nothing runs: only accepting is under test
    write_executors(tmp_path, [gpu])
    # One user's burst of 2000: the operator has lifted the per-user cap and the rate limit.
    server = server_factory(MAX_USER_REQUESTS=0, SERVICE_RATE_PER_S=0)
    await server.start()
    acknowledged: set[str] = set()
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server, "telegram")

        async def send_many() -> None:
            for index in range(2000):
                await bot.send(request_message("kandinsky", "text2img", {"prompt": f"burst {index}"}))

        sender = asyncio.create_task(send_many())
        # Kill in the middle of the burst, with commits and acknowledgements in flight.
        while len(acknowledged) < 300:
            message = await bot.next_message()
            if message.get("gen_status") == "queued":
                acknowledged.add(message["object_id"])
        server.kill()
        await server.wait()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    database_path = tmp_path / "data" / "devoid.sqlite3"
    with sqlite3.connect(database_path) as db:
        stored = {row[0] for row in db.execute("SELECT object_id FROM requests")}
    assert acknowledged <= stored  # an acknowledged request is never lost
    assert len(stored) >= len(acknowledged)


async def test_a_request_interrupted_by_ten_restarts_in_a_row_is_not_run_again(start_backend, start_balancer):
    """It may be what brings the process down: it ends with an error instead of a crash loop."""
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "fatal?"}))
    await bot.close()
    await balancer.client.close()
    with sqlite3.connect(balancer.config.database_path) as db:
        db.execute(
            "UPDATE requests SET status = 'queued', interruptions = 10 WHERE object_id = ?", (queued["object_id"],)
        )

    gpu.state.gate.set()
    restarted = await start_balancer([gpu])
    final = await (await restarted.connect("telegram")).final(queued["object_id"])
    assert final["gen_status"] == "error"
    assert final["result"]["content"].startswith("Interrupted by 10 restarts of the balancer")
    assert final["payload"] == {"prompt": "fatal?"}
    assert len(gpu.state.received) == 1  # the first run only


async def test_sigkill_with_image_requests_waiting_sends_each_image_after_restart(
    tmp_path, start_backend, server_factory
):
    """Images are kept in files beside the database: a kill loses none, a file a crash left
    without its request is deleted at the next start, and a request whose file an operator
    deleted ends with an error naming it instead of stopping the line."""
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()  # the first image request is generating at the kill, the rest wait
    write_executors(tmp_path, [gpu])
    payload_folder = tmp_path / "data" / "devoid.sqlite3.payloads"
    server = server_factory()
    await server.start()
    images = [noisy_png_base64(side=160) for _ in range(4)]  # ~100 KB of base64 each
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server, "telegram")
        ids = []
        for index, image in enumerate(images):
            message = request_message("automatic1111", "img2img", {"init_images": [image], "prompt": f"i{index}"})
            ids.append((await bot.submit(message))["object_id"])
        await wait_until(lambda: gpu.state.running == 1)
        server.kill()
        await server.wait()

        assert sorted(path.stem for path in payload_folder.iterdir()) == sorted(ids)
        (payload_folder / "0123456789abcdef01234567.json").write_text('{"torn": ')  # no request has it
        (payload_folder / f"{ids[2]}.json").unlink()  # an operator's mistake
        gpu.state.gate.set()
        restarted = server_factory()
        await restarted.start()
        bot = await connect(session, restarted, "telegram")
        finals = {object_id: await bot.final(object_id) for object_id in ids}

    assert [finals[object_id]["gen_status"] for object_id in ids] == ["ok", "ok", "error", "ok"]
    assert "stored payload of this request is missing" in finals[ids[2]]["result"]["content"]
    # The backend got each surviving image exactly as sent (the first one twice: it was
    # generating at the kill).
    sent = [call.body["init_images"][0] for call in gpu.state.received]
    assert sent == [images[0], images[0], images[1], images[3]]
    assert finals[ids[1]]["payload"] == {"init_images": [images[1]], "prompt": "i1"}
    assert not (payload_folder / "0123456789abcdef01234567.json").exists()
    assert "deleted 1 payload files that no stored request needs" in restarted.log()
