"""Scheduling figures offline: the `queued` estimate's error on bench/estimates.py's trace, and
the makespan of bench/heterogeneous.py's burst of 60, replayed through the pool's own code
(estimate, placement, speed learning, arrival counting: app/engine/) on a virtual clock: about
a second per seed instead of a minute, and none of a live run's timing noise (event loop lag,
a busy machine), so two versions can be compared on many seeds.

It also takes the error apart. Besides the trace as it is, it replays the same arrivals
- with no premium requests (nothing can arrive later and pass a waiting one): the error left
  by the generation times' +-10 % noise alone;
- with exact generation times (no noise): the error left by the requests that arrive later
  and pass a waiting one;
- with neither: what is left is the estimate's own model (the forecast's reach, the shortcut
  for long lines, speeds still being learned).

What is not replayed: the time from a backend's answer to the final answer (the live bench
measures it: ~6-10 ms here) and the time before `queued` is sent.

How: `time.monotonic` is replaced in this process by the replay's clock; nothing else is.

Usage: .venv/bin/python -m bench.scheduling_replay [--seeds 11-18]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import time
from dataclasses import dataclass

from app.backends.base import Backend, BackendSpec
from app.domain.ids import new_object_id
from app.domain.jobs import ExecutorType, GenType, Job
from app.engine.placement import next_placement
from app.engine.pool import BackendSlot, ExecutorPool
from bench.estimates import BASE_UNITS_PER_S, NOISE, PREMIUM_SHARE, SPEEDS, build_trace, cost
from bench.heterogeneous import is_premium, mixed_jobs, premium_share

A1111 = ExecutorType.AUTOMATIC1111
WARM_UP = 20  # the first requests, while speeds are still being learned, are left out
BURST_SEEDS = 100
# A restart reads back each backend's last jobs (Scheduler.start): as many jobs done count.
RESTORED_JOBS = 10
CLOCK_START = 1000.0
_clock = [CLOCK_START]


@dataclass
class Told:
    premium: bool
    told_s: float
    arrived_at: float
    done_at: float = 0.0


def replay(seed: int, noise: float, premium_share: float) -> list[Told]:
    """The trace through a pool of SPEEDS backends; each request's estimate and outcome."""
    trace = build_trace(400, 60, seed, premium_share)
    return play(trace.requests, BASE_UNITS_PER_S, noise, seed)[WARM_UP:]


def play(
    requests: list[tuple[float, dict, bool]],
    units_per_s_1x: float,
    noise: float,
    seed: int,
    dispatched: list[bool] | None = None,
    speeds_known: bool = False,
) -> list[Told]:
    """`requests` ((offset s, payload, premium), in order) through a pool of SPEEDS backends
    whose speeds it learns from scratch, or, `speeds_known`, knows from the start (as after a
    restart: the last jobs of each backend are read back from SQLite); each request's estimate
    and outcome. `dispatched`, if given, gets whether each job dispatched while both classes
    waited was premium, in dispatch order."""
    pool = ExecutorPool(A1111, (1, 3))
    true_speed: dict[int, float] = {}
    noise_of: dict[int, random.Random] = {}
    for number, (name, factor) in enumerate(SPEEDS.items()):
        spec = BackendSpec(name=name, exec_type=A1111, endpoint="http://127.0.0.1:1", gpu="unknown")
        slot = BackendSlot.for_backend(Backend(spec, session=None))  # type: ignore[arg-type]
        slot.up = slot.probed = True
        pool.slots.append(slot)
        true_speed[id(slot)] = units_per_s_1x * factor
        if speeds_known:
            slot.units_per_s, slot.jobs_done = true_speed[id(slot)], RESTORED_JOBS
        noise_of[id(slot)] = random.Random(seed + number)
    order = itertools.count()
    events: list[tuple[float, int, object]] = []  # (when, tie-break, a request or a finished job)
    # Each replay on the same clock readings, whatever ran before it: float sums at another
    # offset round differently, and a near tie can then go the other way.
    _clock[0] = start = CLOCK_START
    for offset, payload, premium in requests:
        heapq.heappush(events, (start + offset, next(order), (payload, premium)))
    told: dict[str, Told] = {}

    def dispatch() -> None:
        while True:
            both_waited = pool.queue.waiting(True) > 0 and pool.queue.waiting(False) > 0
            placed = next_placement(pool)
            if placed is None:
                return
            job, slot = placed
            slot.job, slot.started_monotonic = job, _clock[0]
            pool.arrivals.started(job)
            if dispatched is not None and both_waited:
                dispatched.append(job.premium)
            factor = noise_of[id(slot)].uniform(1 - noise, 1 + noise) if noise else 1.0
            seconds = job.cost_units / true_speed[id(slot)] * factor
            heapq.heappush(events, (_clock[0] + seconds, next(order), (job, slot, seconds)))

    while events:
        _clock[0], _, event = heapq.heappop(events)
        if len(event) == 2:  # a request arrives
            payload, premium = event
            job = new_request(payload, premium)
            eta_s = pool.eta_for_new(premium, job.cost_units)
            assert eta_s is not None
            told[job.object_id] = Told(premium, eta_s, _clock[0] - start)
            pool.note_arrival(job)
            pool.queue.push(job)
        else:  # a backend finished
            job, slot, seconds = event
            slot.free()
            slot.record_success(job.cost_units, seconds)
            pool.calibrate_unlearned()
            told[job.object_id].done_at = _clock[0] - start
        dispatch()
    return list(told.values())


def burst_makespan(seed: int, speeds_known: bool, jobs: int = 60, ideal_s: float = 30.0) -> float:
    """bench.heterogeneous's burst (its mix of sizes for `seed`, every third premium, all
    queued at once, exact times): makespan / ideal."""
    return max(row.done_at for row in play_burst(seed, jobs, ideal_s, speeds_known=speeds_known)) / ideal_s


def burst_premium_share(seed: int, jobs: int = 500) -> tuple[float, int, int]:
    """bench.heterogeneous's default backlog (500 mixed jobs, every third premium): the premium
    share of the dispatches made while both classes waited, the longest run of premium
    dispatches past a waiting general request, and how many dispatches were counted."""
    dispatched: list[bool] = []
    play_burst(seed, jobs, 15.0, dispatched)
    return premium_share(dispatched)


def play_burst(
    seed: int, jobs: int, ideal_s: float, dispatched: list[bool] | None = None, speeds_known: bool = False
) -> list[Told]:
    """bench.heterogeneous's mix of `jobs` sizes for `seed`, all queued at once, sized so the
    ideal makespan is `ideal_s`, through play() with exact times."""
    payloads = mixed_jobs(jobs, seed)
    units_per_s_1x = sum(cost(payload) for payload in payloads) / sum(SPEEDS.values()) / ideal_s
    requests = [(0.0, payload, is_premium(number)) for number, payload in enumerate(payloads)]
    return play(requests, units_per_s_1x, 0.0, seed, dispatched, speeds_known)


def new_request(payload: dict, premium: bool) -> Job:
    return Job(
        object_id=new_object_id(),
        service="bench",
        executor=A1111,
        gen_type=GenType.TEXT2IMG,
        premium=premium,
        settings={},
        service_info={},
        payload=payload,
        created_at=time.time(),
        cost_units=cost(payload),
    )


def summary(errors: list[float]) -> str:
    if not errors:
        return f"{'-':>22}"
    ordered = sorted(errors)
    p90, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.9, 0.99))
    return f"{statistics.median(ordered):5.2f} {p90:5.2f} {p99:5.2f} (n={len(ordered):4})"


def seeds_of(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="11-18", help="a seed or a range, e.g. 11-18")
    args = parser.parse_args()
    seeds = seeds_of(args.seeds)
    time.monotonic = lambda: _clock[0]  # the replay's clock, for everything in this process
    print(f"relative error of the `queued` estimate, {len(seeds)} seeds, median / p90 / p99")
    print(f"{'replayed':40} {'all':>22} {'premium':>22} {'general':>22}")
    cases = {
        "the trace": (NOISE, PREMIUM_SHARE),
        "no premium: generation noise alone": (NOISE, 0.0),
        "exact times: later arrivals alone": (0.0, PREMIUM_SHARE),
        "neither": (0.0, 0.0),
    }
    for name, (noise, share_of_premium) in cases.items():
        rows = [row for seed in seeds for row in replay(seed, noise, share_of_premium)]
        errors = {
            group: [abs(r.told_s - (r.done_at - r.arrived_at)) / (r.done_at - r.arrived_at) for r in picked]
            for group, picked in {
                "all": rows,
                "premium": [r for r in rows if r.premium],
                "general": [r for r in rows if not r.premium],
            }.items()
        }
        print(f"{name:40} {summary(errors['all'])} {summary(errors['premium'])} {summary(errors['general'])}")
    print(f"\nburst of 60 (bench.heterogeneous's jobs, seeds 1-{BURST_SEEDS}), makespan / ideal")
    for speeds_known, name in ((False, "speeds learned from scratch"), (True, "speeds known (a restart)")):
        makespans = sorted(burst_makespan(seed, speeds_known) for seed in range(1, BURST_SEEDS + 1))
        print(
            f"  {name:28} median {statistics.median(makespans):.3f}, "
            f"p90 {makespans[int(0.9 * len(makespans))]:.3f}, worst {makespans[-1]:.3f}; "
            f"past 1.03: {sum(m > 1.03 for m in makespans)} of {len(makespans)}"
        )
    shares = [burst_premium_share(seed) for seed in range(1, 21)]
    ratios = sorted(share for share, _, _ in shares)
    print(
        f"backlog of 500 (seeds 1-20), premium share while both classes waited (ratio 1 3: 75.0 %): "
        f"{ratios[0]:.1%} / {statistics.median(ratios):.1%} / {ratios[-1]:.1%} (min / median / max); "
        f"longest premium run past a waiting general request: {max(run for _, run, _ in shares)}"
    )


if __name__ == "__main__":
    main()
