"""Scheduling figures offline: the `queued` estimate's error on bench/estimates.py's trace, and
the makespan of bench/heterogeneous.py's burst of 60, replayed through the pool's own code
(estimate, placement, speed learning, arrival counting: app/engine/) on a virtual clock: about
a second per seed instead of a minute, and none of a live run's timing noise (event loop lag,
a busy machine), so two versions can be compared on many seeds.

It also takes the error apart. Besides the trace as it is, it replays the same arrivals
- with the flow going on after the trace (COOL_DOWN arrivals, not measured), as in service;
- with the burst amid the flow rather than at its end (BURST_AMID);
- with no premium requests (nothing can arrive later and pass a waiting one): the error left
  by the generation times' +-10 % noise alone;
- with exact generation times (no noise): the error left by the requests that arrive later
  and pass a waiting one;
- with neither: what is left is the estimate's own model (the forecast's reach, the shortcut
  for long lines, speeds still being learned).

What is not replayed: the time from a backend's answer to the final answer (the live bench
measures it: ~6-10 ms here) and the time before `queued` is sent. Requests that arrive at the
same moment (the burst) are replayed as one read, each estimate knowing those after it, as the
server's estimates know the requests whose commit is under way (app/engine/estimates.py).
For the least error any estimate could have on this trace: bench/estimate_floor.py.

How: `time.monotonic` is replaced in this process by the replay's clock; nothing else is.

Usage: .venv/bin/python -m bench.scheduling_replay [--seeds 11-18]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

from app.backends.base import Backend, BackendSpec
from app.domain.ids import new_object_id
from app.domain.jobs import ExecutorType, GenType, Job
from app.engine.placement import next_placement
from app.engine.pool import BackendSlot, ExecutorPool, Later
from bench.core import quantile
from bench.estimates import BASE_UNITS_PER_S, NOISE, PREMIUM_SHARE, SPEEDS, build_trace, cost
from bench.heterogeneous import is_premium, mixed_jobs, premium_share

A1111 = ExecutorType.AUTOMATIC1111
WARM_UP = 20  # the first requests, while speeds are still being learned, are left out
BURST_SEEDS = 100
# The trace stops dead after its burst, so the requests of its last seconds see none of the
# arrivals their estimates expect from the flow so far (they were told +0.10 to +0.21 too much
# on average, the rest of the trace -0.07 to +0.06). Replayed also with the same flow going on
# after the trace for this many arrivals, not measured (bench/estimates.py build_trace), and
# with the burst amid the flow, after this many arrivals.
COOL_DOWN = 150
BURST_AMID = 300
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


def replay(
    seed: int, noise: float, premium_share: float, burst_after: int | None = None, cool_down: int = 0
) -> list[Told]:
    """The trace through a pool of SPEEDS backends; each measured request's estimate and
    outcome (after the warm-up, not the cool-down's)."""
    trace = build_trace(400, 60, seed, premium_share, burst_after, cool_down)
    return play(trace.requests, BASE_UNITS_PER_S, noise, seed)[WARM_UP : trace.measured]


class Replay:
    """A pool of SPEEDS backends on the replay's clock: requests arrive (`arrive`), backends
    finish their jobs (queued in `finishes`, run by `finish_next`), and after each the
    dispatcher runs (`dispatch`). A job's time on a backend is its cost over the backend's true
    speed, times a uniform draw within +-`noise` from that backend's own seeded sequence.

    Speeds are learned from scratch, or, `speeds_known`, known from the start (as after a
    restart: the last jobs of each backend are read back from SQLite). `dispatched`, if given,
    gets whether each job dispatched while both classes waited was premium, in dispatch order.
    Everything it holds can be copied (copy.deepcopy) to play a copy forward another way
    (bench/estimate_floor.py)."""

    def __init__(
        self,
        units_per_s_1x: float,
        noise: float,
        seed: int,
        dispatched: list[bool] | None = None,
        speeds_known: bool = False,
    ) -> None:
        self.pool = ExecutorPool(A1111, (1, 3))
        self.noise = noise
        self.dispatched = dispatched
        self.true_speed: dict[str, float] = {}
        self.noise_of: dict[str, random.Random] = {}
        for number, (name, factor) in enumerate(SPEEDS.items()):
            spec = BackendSpec(name=name, exec_type=A1111, endpoint="http://127.0.0.1:1", gpu="unknown")
            slot = BackendSlot.for_backend(Backend(spec, session=None))  # type: ignore[arg-type]
            slot.up = slot.probed = True
            self.pool.slots.append(slot)
            self.true_speed[name] = units_per_s_1x * factor
            if speeds_known:
                slot.units_per_s, slot.jobs_done = self.true_speed[name], RESTORED_JOBS
            self.noise_of[name] = random.Random(seed + number)
        # (when it ends, tie-break, the job, its backend, its seconds there)
        self.finishes: list[tuple[float, int, Job, BackendSlot, float]] = []
        self._order = 0

    def arrive(
        self, payload: dict, premium: bool, later: Later | None = None, estimate: bool = True
    ) -> tuple[Job, float]:
        """A request arrives now: its job and the estimate it is told (0 unless `estimate`),
        knowing `later`: those after it in the same burst."""
        job = new_request(payload, premium)
        eta_s = self.pool.eta_for_new(premium, job.cost_units, later) if estimate else 0.0
        assert eta_s is not None
        self.pool.note_arrival(job)
        self.pool.queue.push(job)
        self.dispatch()
        return job, eta_s

    def finish_next(self) -> Job:
        """The next backend to finish does: the clock moves to then. Returns its job."""
        _clock[0], _, job, slot, seconds = heapq.heappop(self.finishes)
        slot.free()
        slot.record_success(job.cost_units, seconds)
        self.pool.calibrate_unlearned()
        self.dispatch()
        return job

    def next_finish_at(self) -> float:
        return self.finishes[0][0] if self.finishes else math.inf

    def run(
        self,
        requests: list[tuple[float, dict, bool]],
        laters: list[Later] | None = None,
        estimate: bool = True,
    ) -> Iterator[tuple[int | None, Job, float]]:
        """Play `requests` ((when, on the replay's clock; payload; premium), in order) and
        every backend's finish, in time order, the clock at each: yields (its number in
        `requests`, its job, its estimate) once a request is queued, (None, the job, 0.0) once
        a backend finished one. A request arriving when a backend finishes comes first."""
        for number, (at, payload, premium) in enumerate(requests):
            while self.next_finish_at() < at:
                yield None, self.finish_next(), 0.0
            _clock[0] = at
            job, eta_s = self.arrive(payload, premium, laters[number] if laters else None, estimate)
            yield number, job, eta_s
        while self.finishes:
            yield None, self.finish_next(), 0.0

    def dispatch(self) -> None:
        pool = self.pool
        while True:
            both_waited = pool.queue.waiting(True) > 0 and pool.queue.waiting(False) > 0
            placed = next_placement(pool)
            if placed is None:
                return
            job, slot = placed
            slot.job, slot.started_monotonic = job, _clock[0]
            pool.arrivals.started(job)
            if self.dispatched is not None and both_waited:
                self.dispatched.append(job.premium)
            noise = self.noise
            factor = self.noise_of[slot.name].uniform(1 - noise, 1 + noise) if noise else 1.0
            self.run_for(job, slot, job.cost_units / self.true_speed[slot.name] * factor)

    def run_for(self, job: Job, slot: BackendSlot, seconds: float) -> None:
        """`job`, started on `slot` at slot.started_monotonic, ends `seconds` after."""
        self._order += 1
        heapq.heappush(self.finishes, (slot.started_monotonic + seconds, self._order, job, slot, seconds))


def play(
    requests: list[tuple[float, dict, bool]],
    units_per_s_1x: float,
    noise: float,
    seed: int,
    dispatched: list[bool] | None = None,
    speeds_known: bool = False,
) -> list[Told]:
    """`requests` ((offset s, payload, premium), in order) through a Replay; each request's
    estimate and outcome."""
    replay = Replay(units_per_s_1x, noise, seed, dispatched, speeds_known)
    # Each replay on the same clock readings, whatever ran before it: float sums at another
    # offset round differently, and a near tie can then go the other way.
    _clock[0] = start = CLOCK_START
    told: dict[str, Told] = {}
    timed = [(start + offset, payload, premium) for offset, payload, premium in requests]
    for number, job, eta_s in replay.run(timed, later_in_bursts(requests)):
        if number is None:
            told[job.object_id].done_at = _clock[0] - start
        else:
            told[job.object_id] = Told(job.premium, eta_s, _clock[0] - start)
    return list(told.values())


def later_in_bursts(requests: list[tuple[float, dict, bool]]) -> list[Later]:
    """For each request, those of the other class after it that arrive at the same moment:
    a burst the server reads at once, as one websocket read holds many requests."""
    laters: list[Later] = []
    counts = {False: 0, True: 0}
    units = {False: 0.0, True: 0.0}
    at = None
    for offset, payload, premium in reversed(requests):
        if offset != at:
            counts, units, at = {False: 0, True: 0}, {False: 0.0, True: 0.0}, offset
        laters.append(Later(counts[not premium], units[not premium]))
        counts[premium] += 1
        units[premium] += cost(payload)
    return laters[::-1]


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
    p90, p99 = quantile(ordered, 0.9), quantile(ordered, 0.99)
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
        "the trace": (NOISE, PREMIUM_SHARE, None, 0),
        "the trace, its flow going on after it": (NOISE, PREMIUM_SHARE, None, COOL_DOWN),
        "the trace, its burst amid the flow": (NOISE, PREMIUM_SHARE, BURST_AMID, 0),
        "no premium: generation noise alone": (NOISE, 0.0, None, 0),
        "exact times: later arrivals alone": (0.0, PREMIUM_SHARE, None, 0),
        "neither": (0.0, 0.0, None, 0),
    }
    for name, (noise, share_of_premium, burst_after, cool_down) in cases.items():
        rows = [row for seed in seeds for row in replay(seed, noise, share_of_premium, burst_after, cool_down)]
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
