"""Balancing mixed GPUs: 4 simulated backends of speeds 1x, 1x, 2x, 4x and a backlog of mixed-size
jobs. Prints the makespan against the ideal (total work / total speed) and against a
speed-blind "first free backend" schedule of the same jobs and against replays of them placed by
earliest finish (in order, and largest first; all computed with exact speeds and no overhead),
plus each backend's busy fraction, and the premium share of the dispatches made while both
classes waited (GENERAL_PREMIUM_RATIO 1 3: 75 % expected; counted from when the whole backlog
is in line) with the longest run of premium dispatches a waiting general request sat through.

The backends learn nothing from the executors file (no `speed` hint): the balancer has to
learn their speeds from their first jobs.

Usage: .venv/bin/python -m bench.heterogeneous [--jobs N] [--seconds S] [--seed K]
(the issue's burst: --jobs 60 --seconds 30, jobs of 1-8 s on the 1x backends)
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import tempfile
import time
from pathlib import Path

import aiohttp

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from app.domain.costs import payload_cost_units
from app.domain.jobs import ExecutorType, GenType
from bench.core import KEY, balancer

SPEEDS = {"gpu-1x-a": 1.0, "gpu-1x-b": 1.0, "gpu-2x": 2.0, "gpu-4x": 4.0}
PREMIUM_EVERY = 3  # every third job of the backlog is premium


def mixed_jobs(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"job {i}",
            "steps": rng.choice([10, 20, 30, 50]),
            "width": rng.choice([256, 512, 768]),
            "height": rng.choice([256, 512, 768]),
        }
        for i in range(count)
    ]


def premium_share(premium: list[bool]) -> tuple[float, int, int]:
    """(premium share, longest premium run, dispatches) over the dispatches made while both
    classes still had requests waiting; `premium` says, in dispatch order, which were."""
    left = {True: sum(premium), False: len(premium) - sum(premium)}
    counted = premium_count = streak = longest = 0
    for is_premium in premium:
        if left[True] and left[False]:
            counted += 1
            premium_count += is_premium
            streak = streak + 1 if is_premium else 0
            longest = max(longest, streak)
        left[is_premium] -= 1
    return premium_count / max(1, counted), longest, counted


def is_premium(job_number: int) -> bool:
    return job_number % PREMIUM_EVERY == 0


def cost(payload: dict) -> float:
    return payload_cost_units(ExecutorType.AUTOMATIC1111, GenType.TEXT2IMG, payload)


def first_free_makespan(costs: list[float], speeds: list[float]) -> float:
    """FIFO jobs, each to whichever backend frees up first (ties: list order), speed-blind."""
    free_at = [(0.0, index) for index in range(len(speeds))]
    heapq.heapify(free_at)
    end = 0.0
    for units in costs:
        start, index = heapq.heappop(free_at)
        finish = start + units / speeds[index]
        end = max(end, finish)
        heapq.heappush(free_at, (finish, index))
    return end


def earliest_finish_makespan(costs: list[float], speeds: list[float]) -> float:
    """Each job, in the order given, to the backend that would finish it first (knowing every
    speed exactly): the replay baseline for placement by earliest finish."""
    free_at = [0.0] * len(speeds)
    for units in costs:
        index = min(range(len(speeds)), key=lambda i: free_at[i] + units / speeds[i])
        free_at[index] += units / speeds[index]
    return max(free_at)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15.0, help="target ideal makespan")
    parser.add_argument("--seed", type=int, default=7, help="which mix of job sizes")
    args = parser.parse_args()
    jobs = mixed_jobs(args.jobs, args.seed)
    total_units = sum(cost(job) for job in jobs)
    base_units_per_s = total_units / sum(SPEEDS.values()) / args.seconds

    runners, states, entries = [], {}, []
    for name, factor in SPEEDS.items():
        state = DemoBackendState(units_per_s=base_units_per_s * factor)
        state.gate.clear()
        runner, endpoint = await serve_on_loopback(automatic1111_app(state))
        runners.append(runner)
        states[name] = state
        entries.append({"name": name, "exec_type": "automatic1111", "gpu": "unknown", "endpoint": endpoint})

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = balancer(folder, entries, SAVE_IMAGES_LOCALLY="0", PROGRESS_INTERVAL_S="0")
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(
                    f"{server.base_url}/ws/bench", headers={"authorization": KEY, "service": "bench"}, max_msg_size=0
                ) as ws:
                    for number, job in enumerate(jobs):
                        await ws.send_json(
                            {
                                "message_type": "request",
                                "executor": "automatic1111",
                                "gen_type": "text2img",
                                "settings": {"premium": int(is_premium(number))},
                                "service_info": {"user_id": number},
                                "payload": job,
                            }
                        )
                    queued = 0
                    while queued < len(jobs):
                        queued += json.loads((await ws.receive()).data).get("gen_status") == "queued"
                    released = time.monotonic()
                    for state in states.values():
                        state.gate.set()
                    done = 0
                    while done < len(jobs):
                        message = json.loads((await ws.receive()).data)
                        if message.get("gen_status") == "error":
                            raise RuntimeError(message["result"]["content"])
                        done += message.get("gen_status") == "ok"
        finally:
            await server.stop()
            for runner in runners:
                await runner.cleanup()

    calls = [call for state in states.values() for call in state.received]
    makespan = max(call.finished_at for call in calls) - released
    ideal = total_units / (base_units_per_s * sum(SPEEDS.values()))
    costs, speeds = [cost(job) for job in jobs], [base_units_per_s * factor for factor in SPEEDS.values()]
    blind = first_free_makespan(costs, speeds)
    fifo_earliest = earliest_finish_makespan(costs, speeds)
    largest_first = earliest_finish_makespan(sorted(costs, reverse=True), speeds)
    print(f"{len(jobs)} mixed jobs on 4 backends (1x, 1x, 2x, 4x), speeds learned, not hinted")
    print(f"  ideal makespan (work / total speed):     {ideal:6.2f} s")
    print(f"  balancer makespan (measured):            {makespan:6.2f} s   ({makespan / ideal:.3f} x ideal)")
    print(f"  speed-blind first-free (computed):       {blind:6.2f} s   ({blind / ideal:.3f} x ideal)")
    print(f"  earliest finish, FIFO (computed):        {fifo_earliest:6.2f} s   ({fifo_earliest / ideal:.3f} x ideal)")
    print(f"  earliest finish, largest first (comp.):  {largest_first:6.2f} s   ({largest_first / ideal:.3f} x ideal)")
    # Counted from the backlog's release: the first jobs went to the idle backends as they
    # arrived, before the rest of the backlog (and the other class) was in line.
    in_order = sorted((call for call in calls if call.started_at >= released), key=lambda call: call.started_at)
    share, streak, both = premium_share([is_premium(int(call.body["prompt"].split()[1])) for call in in_order])
    print(f"  premium share while both classes waited: {share:.1%} of {both} dispatches (ratio 1 3: 75.0 %);")
    print(f"  longest run of premium dispatches past a waiting general request: {streak} (the ratio allows 3)")
    print("  backend     speed  jobs  busy fraction")
    for name, state in states.items():
        busy = sum(call.finished_at - max(call.started_at, released) for call in state.received)
        print(f"  {name:10s} {SPEEDS[name]:4.0f}x  {len(state.received):4d}  {busy / makespan:6.1%}")


if __name__ == "__main__":
    asyncio.run(main())
