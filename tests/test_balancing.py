"""Heterogeneous GPUs: when several are free, the job goes to the one expected to finish it
first, by speed hints from the executors file or by speeds learned from finished jobs."""

from __future__ import annotations

from types import SimpleNamespace

from app import keys
from app.domain.costs import REFERENCE_UNITS_PER_S
from bench.bots import request_message

JOB = {"prompt": "a harbour", "steps": 20, "width": 512, "height": 512}
JOB_UNITS = 20 * 512 * 512


async def run_one(bot, prompt: str) -> None:
    queued = await bot.submit(request_message("automatic1111", "text2img", {**JOB, "prompt": prompt}))
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"


async def test_the_faster_of_two_free_backends_gets_the_job_by_hint(start_backend, start_balancer):
    slow = await start_backend("automatic1111", name="slow")
    fast = await start_backend("automatic1111", name="fast")
    # Listed slow first, so a first-free pick would choose it.
    balancer = await start_balancer([slow.entry(speed=1.0), fast.entry(speed=2.0)])
    bot = await balancer.connect("telegram")

    for index in range(3):
        await run_one(bot, f"one at a time {index}")
    assert len(fast.state.received) == 3 and not slow.state.received


async def test_the_faster_backend_is_learned_from_its_own_jobs(start_backend, start_balancer):
    # Real speeds 1x and 2x of 10 jobs/s; the executors file says nothing about them.
    slow = await start_backend("automatic1111", name="slow", units_per_s=JOB_UNITS / 0.2)
    fast = await start_backend("automatic1111", name="fast", units_per_s=JOB_UNITS / 0.1)
    balancer = await start_balancer([slow.entry(gpu="same"), fast.entry(gpu="same")])
    bot = await balancer.connect("telegram")

    # Two jobs at once: each backend runs one and learns its speed.
    first = [
        await bot.submit(request_message("automatic1111", "text2img", {**JOB, "prompt": f"warm {i}"})) for i in range(2)
    ]
    for queued in first:
        await bot.final(queued["object_id"])
    assert len(slow.state.received) == 1 and len(fast.state.received) == 1

    for index in range(3):
        await run_one(bot, f"learned {index}")
    assert [c.body["prompt"] for c in fast.state.received[1:]] == [f"learned {i}" for i in range(3)]
    speeds = {b["name"]: b["units_per_s"] for b in balancer.app[keys.SCHEDULER].fleet.backends_status()}
    assert 1.5 < speeds["fast"] / speeds["slow"] < 2.5


async def test_job_timeout_follows_the_expected_duration_within_floor_and_cap(start_backend, start_balancer):
    gpu = await start_backend("automatic1111", name="gpu")
    balancer = await start_balancer(
        [gpu.entry(timeout=None, speed=1.0)], JOB_TIMEOUT_FLOOR_S=30, JOB_TIMEOUT_CAP_S=600, JOB_TIMEOUT_FACTOR=4
    )
    scheduler = balancer.app[keys.SCHEDULER]
    [slot] = [slot for pool in scheduler.pools.values() for slot in pool.slots]

    def timeout_for(expected_s: float) -> float:
        return scheduler.attempts.timeout_s(slot, SimpleNamespace(cost_units=REFERENCE_UNITS_PER_S * expected_s))

    assert timeout_for(1) == 30  # 4 s, raised to the floor
    assert timeout_for(20) == 80  # 20 s expected x 4
    assert timeout_for(1000) == 600  # the cap
