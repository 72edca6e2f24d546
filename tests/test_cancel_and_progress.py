"""A client cancels its own queued or running request (never another service's), and sees
progress of a running AUTOMATIC1111 request in order until it completes."""

from __future__ import annotations

import asyncio

import pytest

from bench.bots import request_message, wait_until
from tests.conftest import cancel_action


async def test_cancelling_a_queued_request_removes_it(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    running = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "running"}))
    waiting = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "waiting"}))

    await bot.send(cancel_action(waiting["object_id"]))
    answer = await bot.next_message(lambda m: m.get("info_type") == "cancel")
    done = await bot.final(waiting["object_id"])
    gpu.state.gate.set()
    assert (await bot.final(running["object_id"]))["gen_status"] == "ok"

    assert answer == {
        "message_type": "info",
        "info_type": "cancel",
        "content": "cancelled",
        "outcome": "cancelled",
        "object_id": waiting["object_id"],
    }
    assert done["gen_status"] == "error" and done["result"]["content"] == "cancelled"
    assert [c.body["prompt"] for c in gpu.state.received] == ["running"]


async def test_cancelling_a_running_request_interrupts_its_backend(start_backend, start_balancer):
    gpu = await start_backend("automatic1111", delay_s=30)
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "long"}))
    await bot.next_message(lambda m: m.get("gen_status") == "generating")

    await bot.send(cancel_action(queued["object_id"]))
    done = await bot.final(queued["object_id"])
    assert done["gen_status"] == "error" and done["result"]["content"] == "cancelled"
    await wait_until(lambda: gpu.state.interrupts == 1 and gpu.state.running == 0)

    # The backend is free again and serves the next request.
    gpu.state.delay_s = 0
    following = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "next"}))
    assert (await bot.final(following["object_id"]))["gen_status"] == "ok"
    assert bot.statuses(queued["object_id"]) == ["queued", "generating", "error"]


async def test_a_service_cannot_cancel_another_services_request(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    owner = await balancer.connect("telegram")
    other = await balancer.connect("discord")
    queued = await owner.submit(request_message("kandinsky", "text2img", {"prompt": "mine"}))

    await other.send(cancel_action(queued["object_id"]))
    answer = await other.next_message(lambda m: m.get("info_type") == "cancel")
    gpu.state.gate.set()

    assert answer["content"] == "No queued or running request of this service has that object_id."
    assert (await owner.final(queued["object_id"]))["gen_status"] == "ok"


async def test_a_malformed_cancel_is_answered(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await balancer.connect("telegram")
    await bot.send({"message_type": "info", "action": "cancel", "object_id": "nope"})
    answer = await bot.next_message()
    assert answer["info_type"] == "error" and "object_id" in answer["errors"]


async def test_progress_arrives_in_order_and_stops_at_completion(start_backend, start_balancer):
    gpu = await start_backend("automatic1111", delay_s=0.8)
    balancer = await start_balancer([gpu], PROGRESS_INTERVAL_S=0.1)
    bot = await balancer.connect("telegram")
    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "slow"}))
    await bot.final(queued["object_id"])

    mine = [m for m in bot.received if m.get("object_id") == queued["object_id"]]
    kinds = [m.get("gen_status") or m["info_type"] for m in mine]
    assert kinds[:2] == ["queued", "generating"] and kinds[-1] == "ok"
    progress = [m for m in mine if m.get("info_type") == "progress"]
    assert len(progress) >= 3 and kinds[2:-1] == ["progress"] * len(progress)
    fractions = [m["progress"] for m in progress]
    assert fractions == sorted(set(fractions)) and fractions[0] > 0 and fractions[-1] <= 1
    assert all(m["eta_relative"] >= 0 for m in progress)
    # Nothing arrives after the final answer (three poll intervals pass).
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bot.ws.receive(), 0.3)


async def test_a_waiting_request_hears_when_its_estimate_moves(start_backend, start_balancer):
    # The executors file says this GPU is 100x the reference; it is slow. Once its first job
    # ends the balancer knows better, and the requests still waiting are told.
    slow = await start_backend("automatic1111", name="slow", delay_s=3)
    balancer = await start_balancer([slow.entry(speed=100)])
    bot = await balancer.connect("telegram")
    ids = [
        (await bot.submit(request_message("automatic1111", "text2img", {"prompt": f"p{n}", "steps": 20})))["object_id"]
        for n in range(3)
    ]
    told = await bot.next_message(lambda m: m.get("info_type") == "eta" and m.get("object_id") == ids[2], timeout_s=20)
    [queued] = [m for m in bot.received if m.get("object_id") == ids[2] and m.get("gen_status") == "queued"]
    assert queued["avg_time"] < 1  # what the stated speed promised
    assert told["eta_s"] >= 2.5  # its own 3 s job at least
    assert "ready in about" in told["content"]
