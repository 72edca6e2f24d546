"""A restart with a long queue: the server serves at once while it reads the stored requests
back, and nothing about order, cancels or limits changes because of it."""

from __future__ import annotations

import asyncio

from app import keys
from app.domain.costs import job_cost_units
from app.domain.jobs import ExecutorType
from bench.bots import request_message
from tests.conftest import cancel_action, new_job

BACKLOG = 20_000
FULL_USER = 777  # has as many requests stored as one user may hold (MAX_USER_REQUESTS 20)


async def store_backlog(open_store, database) -> list:
    backlog = [
        new_job(premium=n % 10 == 0, service_info={"user_id": n}, payload={"prompt": f"stored {n}"})
        for n in range(BACKLOG - 20)
    ] + [new_job(service_info={"user_id": FULL_USER}, payload={"prompt": "stored, capped user"}) for _ in range(20)]
    for job in backlog:
        job.cost_units = job_cost_units(job)  # as intake stores it
    store = await open_store(database)  # closed by the fixture too, should an add fail
    for start in range(0, len(backlog), 2000):
        await asyncio.gather(*(store.add(job) for job in backlog[start : start + 2000]))
    await store.close()
    return backlog


async def test_a_restart_with_20000_queued_serves_while_reading_them_back_in_order(
    tmp_path, start_backend, start_balancer, open_store
):
    database = tmp_path / "data" / "devoid.sqlite3"
    database.parent.mkdir(parents=True)
    backlog = await store_backlog(open_store, database)
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()  # the GPU holds its first job: the rest stays in line to be inspected

    balancer = await start_balancer([gpu], MAX_SERVICE_REQUESTS=1_000_000)
    scheduler = balancer.app[keys.SCHEDULER]
    bot = await balancer.connect("telegram")
    newcomers = []
    for index, premium in enumerate((0, 1, 0)):
        message = request_message("kandinsky", "text2img", {"prompt": f"new {index}"}, premium=premium, user_id=-index)
        newcomers.append(await bot.submit(message))
    over_cap = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "one more"}, user_id=FULL_USER))
    # All of the above happened while the stored requests were still being read back.
    assert scheduler.reading_backlog
    last_stored_general = backlog[-21]
    await bot.send(cancel_action(last_stored_general.object_id))
    cancelled = await bot.next_message(lambda m: m.get("info_type") == "cancel")

    await asyncio.wait_for(scheduler.backlog_loaded(), 30)
    assert [answer["gen_status"] for answer in newcomers] == ["queued"] * 3
    # Not yet read back when the cancel came: it waited for the reading, then found it.
    assert cancelled["outcome"] == "cancelled"
    assert over_cap["gen_status"] == "error" and over_cap["code"] == "user_queue_full"

    # The GPU got the oldest stored request; every line is the stored requests in arrival
    # order, then what arrived since the start.
    assert [call.body["prompt"] for call in gpu.state.received] == ["stored 0"]
    line = list(scheduler.pools[ExecutorType.KANDINSKY].queue)
    still_stored = [job for job in backlog[1:] if job is not last_stored_general]
    for premium in (True, False):
        expected = [job.object_id for job in still_stored if job.premium is premium]
        expected += [answer["object_id"] for answer, p in zip(newcomers, (0, 1, 0), strict=True) if bool(p) is premium]
        assert [job.object_id for job in line if job.premium is premium] == expected
    await bot.close()
