"""Cancels and storage faults that land at awkward moments: a cancel during a retry's wait
touches no other job, a cancel while the answer is being stored is answered "too late" and
the request still gets its one final, a database that stops taking writes delays requests
(with one notice) instead of silencing them until a restart, and a burst it cannot store is
refused at once, readably."""

from __future__ import annotations

import logging

from app import keys
from app.domain.lifecycle import Phase
from bench.bots import request_message, wait_until
from tests.conftest import cancel_action, database_refusing_writes


async def a_gpu_that_holds_its_jobs(start_backend, start_balancer):
    """A balancer with one Kandinsky backend whose jobs wait at its gate, and a bot."""
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    return gpu, balancer, await balancer.connect("telegram")


async def test_cancelling_a_request_that_waits_to_be_retried_leaves_the_running_job_alone(
    start_backend, start_balancer
):
    gpu = await start_backend("kandinsky")
    balancer = await start_balancer([gpu], RETRY_BACKOFF_S=30, BREAKER_FAILURES=10)
    scheduler = balancer.app[keys.SCHEDULER]
    bot = await balancer.connect("telegram")
    gpu.state.fail_status = 500  # the first attempt of A fails: A waits 30 s for its retry
    a = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "A"}))
    await bot.next_message(lambda m: m.get("info_type") == "retrying")
    assert scheduler.phase_of(a["object_id"]) is Phase.RETRY_WAIT

    gpu.state.fail_status = None
    gpu.state.gate.clear()
    b = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "B"}))
    await wait_until(lambda: gpu.state.running == 1)  # B now runs on the backend A used
    await bot.send(cancel_action(a["object_id"]))
    answer = await bot.next_message(lambda m: m.get("info_type") == "cancel")
    cancelled = await bot.final(a["object_id"])
    gpu.state.gate.set()
    done = await bot.final(b["object_id"])

    assert answer["outcome"] == "cancelled"
    assert cancelled["result"]["content"] == "cancelled"
    assert done["gen_status"] == "ok"  # B was not cancelled in A's place
    assert gpu.state.interrupts == 0
    assert [call.body["prompt"] for call in gpu.state.received] == ["A", "B"]


async def test_a_cancel_while_the_answer_is_stored_is_too_late_and_the_final_comes_once(start_backend, start_balancer):
    gpu, balancer, bot = await a_gpu_that_holds_its_jobs(start_backend, start_balancer)
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "a fox"}))
    await wait_until(lambda: gpu.state.running == 1)

    with database_refusing_writes(balancer.config.database_path):
        gpu.state.gate.set()  # the image comes back; its final status cannot be committed yet
        await wait_until(lambda: balancer.app[keys.SCHEDULER].phase_of(queued["object_id"]) is Phase.FINISHING)
        await bot.send(cancel_action(queued["object_id"]))
        answer = await bot.next_message(lambda m: m.get("info_type") == "cancel")
    final = await bot.final(queued["object_id"])

    assert answer["outcome"] == "finishing"
    assert final["gen_status"] == "ok"
    # The connection is fine, and nothing else arrives for the request.
    again = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "next"}))
    await bot.final(again["object_id"])
    assert [
        m["gen_status"]
        for m in bot.received
        if m.get("object_id") == queued["object_id"] and m.get("message_type") == "response"
    ] == ["queued", "generating", "ok"]


async def test_requests_resume_without_a_restart_once_the_database_takes_writes_again(start_backend, start_balancer):
    gpu, balancer, bot = await a_gpu_that_holds_its_jobs(start_backend, start_balancer)
    running = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "running"}))
    waiting = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "waiting"}))
    await wait_until(lambda: gpu.state.running == 1)

    with database_refusing_writes(balancer.config.database_path):
        gpu.state.gate.set()
        # Both are held: one cannot record its result, the next cannot record its claim.
        notices = [
            await bot.next_message(lambda m: m.get("info_type") == "storage_retry", timeout_s=20) for _ in range(2)
        ]
        assert {n["object_id"] for n in notices} == {running["object_id"], waiting["object_id"]}
        assert "database is locked" in notices[0]["content"]
    finals = [await bot.final(r["object_id"], timeout_s=20) for r in (running, waiting)]

    assert [f["gen_status"] for f in finals] == ["ok", "ok"]
    # Told once each, although every retry failed until the lock went.
    assert sum(1 for m in bot.received if m.get("info_type") == "storage_retry") == 2
    store = balancer.app[keys.STORE]
    assert [(await store.reads.get(r["object_id"])).attempts for r in (running, waiting)] == [1, 1]


async def test_a_burst_the_database_cannot_store_is_refused_readably_and_leaves_nothing_behind(
    start_backend, start_balancer, caplog
):
    caplog.set_level(logging.WARNING, logger="app.storage.group_commit")
    gpu, balancer, bot = await a_gpu_that_holds_its_jobs(start_backend, start_balancer)
    running = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "running"}))
    await bot.next_message(lambda m: m.get("gen_status") == "generating")  # its claim is committed

    with database_refusing_writes(balancer.config.database_path):
        for prompt, premium in (("general", 0), ("premium 1", 1), ("premium 2", 1)):
            await bot.send(request_message("kandinsky", "text2img", {"prompt": prompt}, premium=premium))
        refusals = [await bot.next_message(lambda m: m.get("gen_status") == "error", timeout_s=20) for _ in range(3)]
    assert [r["payload"]["prompt"] for r in refusals] == ["general", "premium 1", "premium 2"]
    for refusal in refusals:
        assert refusal["code"] == "not_stored"
        assert refusal["result"]["content"].startswith("The request could not be stored, it was not queued:")
        assert "database is locked" in refusal["result"]["content"]
    # The burst was tried in one transaction, which waited out the lock once: each of its
    # requests alone would only have waited for the same lock again.
    failed = [r for r in caplog.records if "write transaction" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    # None of them is counted anywhere: not against the user, not in the next one's estimate.
    assert len(balancer.app[keys.SCHEDULER].estimates.committing) == 0
    assert (await balancer.app[keys.STORE].reads.get(refusals[0]["object_id"])) is None

    after = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "after"}))
    assert after["gen_status"] == "queued"
    gpu.state.gate.set()
    for queued in (running, after):
        assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    assert [call.body["prompt"] for call in gpu.state.received] == ["running", "after"]
