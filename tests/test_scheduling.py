"""Premium weighting, first-come order, one job per GPU, and GPUs sharing one queue."""

from __future__ import annotations

import asyncio

from app import keys
from app.domain.costs import REFERENCE_UNITS_PER_S
from bench.bots import request_message
from bench.images import noisy_png_base64


async def fill_queue(bot, jobs: list[tuple[str, int]]) -> dict[str, str]:
    """Submit (prompt, premium) pairs; returns object_id -> prompt."""
    ids = {}
    for prompt, premium in jobs:
        queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": prompt}, premium=premium))
        assert queued["gen_status"] == "queued"
        ids[queued["object_id"]] = prompt
    return ids


async def run_backlog(start_backend, start_balancer, jobs, **env):
    """One held GPU, a backlog built behind a first job, then the GPU let go. Returns the
    prompts in the order the GPU received them, after the first."""
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    # One user sends the whole backlog: no per-user cap here.
    balancer = await start_balancer([gpu], **{"MAX_USER_REQUESTS": 0, **env})
    bot = await balancer.connect("telegram")
    ids = await fill_queue(bot, [("first", 0)] + jobs)
    gpu.state.gate.set()
    for object_id in ids:
        assert (await bot.final(object_id))["gen_status"] == "ok"
    assert gpu.state.max_running == 1  # never two jobs at once on one GPU
    order = [call.body["prompt"] for call in gpu.state.received]
    assert order[0] == "first"
    return order[1:]


async def test_ratio_1_3_gives_three_premium_per_general_while_both_wait(start_backend, start_balancer):
    jobs = [(f"g{i}", 0) for i in range(8)] + [(f"p{i}", 1) for i in range(12)]
    order = await run_backlog(start_backend, start_balancer, jobs, GENERAL_PREMIUM_RATIO="1 3")

    # While both classes wait (the first 16 dispatches), every 4 hold 3 premium and 1 general.
    for window in range(0, 16, 4):
        classes = [prompt[0] for prompt in order[window : window + 4]]
        assert sorted(classes) == ["g", "p", "p", "p"], order
    # Then only general requests are left: they follow without a premium slot left empty.
    assert order[16:] == ["g4", "g5", "g6", "g7"]
    # Each class is served oldest first.
    assert [p for p in order if p[0] == "g"] == [f"g{i}" for i in range(8)]
    assert [p for p in order if p[0] == "p"] == [f"p{i}" for i in range(12)]


async def test_ratio_2_1_favours_general(start_backend, start_balancer):
    jobs = [(f"g{i}", 0) for i in range(6)] + [(f"p{i}", 1) for i in range(3)]
    order = await run_backlog(start_backend, start_balancer, jobs, GENERAL_PREMIUM_RATIO="2 1")
    for window in range(0, 9, 3):
        assert sorted(p[0] for p in order[window : window + 3]) == ["g", "g", "p"], order


async def test_a_lone_class_is_served_in_arrival_order(start_backend, start_balancer):
    premium_only = await run_backlog(start_backend, start_balancer, [(f"p{i}", 1) for i in range(10)])
    assert premium_only == [f"p{i}" for i in range(10)]


async def test_general_only_is_served_in_arrival_order(start_backend, start_balancer):
    general_only = await run_backlog(
        start_backend, start_balancer, [(f"g{i}", 0) for i in range(10)], GENERAL_PREMIUM_RATIO="1 3"
    )
    assert general_only == [f"g{i}" for i in range(10)]


async def test_backends_of_one_type_share_its_queue_one_job_each(start_backend, start_balancer):
    gpus = [await start_backend("automatic1111", delay_s=0.02) for _ in range(3)]
    for gpu in gpus:
        gpu.state.gate.clear()
    balancer = await start_balancer(gpus)
    bot = await balancer.connect("telegram")
    ids = await fill_queue(bot, [(f"job{i}", i % 2) for i in range(12)])

    # All three GPUs got a job at once, and none got a second while the first was held.
    async with asyncio.timeout(5):
        while sum(len(gpu.state.received) for gpu in gpus) < 3:
            await asyncio.sleep(0.01)
    assert [len(gpu.state.received) for gpu in gpus] == [1, 1, 1]
    for gpu in gpus:
        gpu.state.gate.set()
    for object_id in ids:
        assert (await bot.final(object_id))["gen_status"] == "ok"
    assert all(gpu.state.max_running == 1 for gpu in gpus)
    assert sum(len(gpu.state.received) for gpu in gpus) == 12
    assert all(gpu.state.received for gpu in gpus)


async def test_queued_eta_grows_with_the_queue(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    etas = []
    for i in range(4):
        queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": f"{i}"}))
        etas.append(queued["avg_time"])
    gpu.state.gate.set()
    assert etas == sorted(etas) and etas[-1] > etas[0] > 0


async def test_a_large_waiting_payload_is_kept_in_sqlite_not_memory(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    big = {"prompt": "big", "init_images": [noisy_png_base64(200)]}  # about 120 kB
    first = await bot.submit(request_message("automatic1111", "img2img", big))
    waiting = await bot.submit(request_message("automatic1111", "img2img", {**big, "prompt": "second"}))
    cancelled = await bot.submit(request_message("automatic1111", "img2img", {**big, "prompt": "third"}))

    queue = next(p.queue for p in balancer.app[keys.SCHEDULER].pools.values() if len(p.queue))
    assert [job.payload for job in queue] == [None, None]  # waiting, out of memory

    await bot.send({"message_type": "info", "action": "cancel", "object_id": cancelled["object_id"]})
    gone = await bot.final(cancelled["object_id"])
    assert gone["result"]["content"] == "cancelled" and gone["payload"]["prompt"] == "third"
    gpu.state.gate.set()
    for queued, prompt in ((first, "big"), (waiting, "second")):
        done = await bot.final(queued["object_id"])
        assert done["gen_status"] == "ok" and done["payload"] == {**big, "prompt": prompt}
    assert [call.body for call in gpu.state.received] == [big, {**big, "prompt": "second"}]


async def test_a_restart_starts_with_the_speeds_learned_before_it(start_backend, start_balancer):
    gpu = await start_backend("automatic1111", units_per_s=50e6)  # ~38x the reference GPU
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    for n in range(3):
        queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": f"p{n}", "steps": 10}))
        await bot.final(queued["object_id"])
    [learned] = balancer.app[keys.SCHEDULER].fleet.backends_status()
    await bot.close()
    await balancer.client.close()

    restarted = await start_balancer([gpu])
    [warm] = restarted.app[keys.SCHEDULER].fleet.backends_status()
    seed = REFERENCE_UNITS_PER_S
    assert learned["units_per_s"] > 10 * seed  # it did learn
    assert abs(warm["units_per_s"] - learned["units_per_s"]) <= 0.05 * learned["units_per_s"]
    # ... and the first estimate after the restart uses it: a 10-step job is quoted well under a second.
    bot = await restarted.connect("telegram")
    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "after", "steps": 10}))
    assert queued["avg_time"] < 1.0


async def test_a_general_request_is_told_it_waits_for_the_premium_ones_sent_right_after_it(
    start_backend, start_balancer
):
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], GENERAL_PREMIUM_RATIO="1 3", MAX_USER_REQUESTS=0)
    bot = await balancer.connect("telegram")
    large = {"steps": 50, "width": 1024, "height": 1024}
    first = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "first", **large}))

    # One general request, then three premium ones, sent in one go: read and committed
    # together. The ratio (premium, premium, general, premium, ...) lets two of them go first,
    # so the general one is told to wait for those two.
    burst = [("general", 0), ("premium 1", 1), ("premium 2", 1), ("premium 3", 1)]
    for prompt, premium in burst:
        await bot.send(request_message("automatic1111", "text2img", {"prompt": prompt, **large}, premium=premium))
    told = {}
    for _ in burst:
        queued = await bot.next_message(lambda m: m.get("gen_status") == "queued")
        told[queued["object_id"]] = queued["avg_time"]
    prompt_of = dict(zip(told, (prompt for prompt, _ in burst), strict=True))
    by_estimate = sorted(told, key=told.__getitem__)
    assert [prompt_of[object_id] for object_id in by_estimate] == ["premium 1", "premium 2", "general", "premium 3"]

    # And so it goes: the GPU runs them in the order of their estimates.
    gpu.state.gate.set()
    for object_id in [first["object_id"], *told]:
        assert (await bot.final(object_id))["gen_status"] == "ok"
    ran = [call.body["prompt"] for call in gpu.state.received]
    assert ran == ["first"] + [prompt_of[object_id] for object_id in by_estimate]
