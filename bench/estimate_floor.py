"""The least error any `queued` estimate can have on bench/estimates.py's trace, beside the
error of this server's estimate on the same requests (bench/scheduling_replay.py replays both).

At the moment each request arrives, the replay is copied and each copy is played forward to
that request's final, each with a fresh draw of what no estimate can know at that moment:
- the requests still to come, drawn as the trace draws them (its Poisson arrivals at its rate
  until its 400th, then its burst of 60; their sizes; 25 % premium);
- every generation time's +-10 % noise, a running job's within what its elapsed time still
  allows.
The copies know more than the server does (each backend's true speed; how many requests are
still to come and when the burst is), so what follows is a floor, not an estimate of one.

An estimate t is off by at most x exactly when the outcome lies within [t/(1+x), t/(1-x)].
So for each request, the largest share of its played-forward outcomes that one such window
holds is the most any estimate can get within x of it (with few samples, more than that:
the floor comes out lower, never higher). Summed over requests, one minus that share is the
fewest requests (on average) any estimate misses by more than x; the targets (median 0.10,
p90 0.25, p99 0.6) allow 50 %, 10 % and 1 %.

Usage: .venv/bin/python -m bench.estimate_floor [--seeds 11-13] [--samples 30]
(about 70 s per seed at 30 samples on this machine)
"""

from __future__ import annotations

import argparse
import bisect
import copy
import heapq
import random
import time
from dataclasses import dataclass

from bench.estimates import BASE_UNITS_PER_S, NOISE, PREMIUM_SHARE, Trace, build_trace, draw_payload
from bench.scheduling_replay import (
    CLOCK_START,
    WARM_UP,
    Replay,
    _clock,
    later_in_bursts,
    seeds_of,
)

ARRIVALS, BURST = 400, 60
TARGETS = {0.10: 0.50, 0.25: 0.10, 0.60: 0.01}  # error -> the share of requests allowed past it


@dataclass
class Request:
    premium: bool
    told_s: float
    outcome_s: float = 0.0  # in the replay itself
    reachable: dict[float, float] | None = None  # error -> the most any estimate gets within it


def still_to_come(trace: Trace, number: int, now: float, rng: random.Random) -> list[tuple[float, dict, bool]]:
    """A fresh draw of the trace's requests after its `number`th (0-based), from `now` on."""
    drawn, clock = [], now
    for later in range(number + 1, ARRIVALS):
        clock += rng.expovariate(trace.arrivals_per_s)
        drawn.append((clock, draw_payload(rng, later), rng.random() < PREMIUM_SHARE))
    burst_at = clock + 1.0 if number < ARRIVALS else now
    for later in range(max(number + 1, ARRIVALS), ARRIVALS + BURST):
        drawn.append((burst_at, draw_payload(rng, later), rng.random() < PREMIUM_SHARE))
    return drawn


def play_forward(replay: Replay, object_id: str, future: list[tuple[float, dict, bool]], rng: random.Random) -> float:
    """Play a copy of `replay` with these requests to come and fresh noise until the request
    `object_id` is done; the clock then."""
    ahead = copy.deepcopy(replay)
    now = _clock[0]
    for name in ahead.noise_of:
        ahead.noise_of[name] = rng
    redrawn = []
    for _, order, job, slot, _ in ahead.finishes:
        exact_s = job.cost_units / ahead.true_speed[slot.name]
        lowest = max(1 - NOISE, (now - slot.started_monotonic) / exact_s)
        seconds = exact_s * rng.uniform(lowest, max(lowest, 1 + NOISE))
        redrawn.append((slot.started_monotonic + seconds, order, job, slot, seconds))
    heapq.heapify(redrawn)
    ahead.finishes = redrawn
    for number, job, _ in ahead.run(future, estimate=False):
        if number is None and job.object_id == object_id:
            return _clock[0]
    raise AssertionError(f"{object_id} never finished")


def most_within(outcomes: list[float], error: float) -> float:
    """The largest share of `outcomes` one estimate can be within `error` of."""
    ordered = sorted(outcomes)
    widest = (1 + error) / (1 - error)
    return max(bisect.bisect_right(ordered, low * widest) - at for at, low in enumerate(ordered)) / len(ordered)


def replay_with_floor(seed: int, samples: int) -> list[Request]:
    trace = build_trace(ARRIVALS, BURST, seed, PREMIUM_SHARE)
    replay = Replay(BASE_UNITS_PER_S, NOISE, seed)
    rng = random.Random(seed * 1000)
    _clock[0] = start = CLOCK_START
    requests: dict[str, tuple[Request, float]] = {}
    timed = [(start + offset, payload, premium) for offset, payload, premium in trace.requests]
    for number, job, told_s in replay.run(timed, later_in_bursts(trace.requests)):
        if number is None:
            request, arrived_at = requests[job.object_id]
            request.outcome_s = _clock[0] - arrived_at
            continue
        arrived_at = _clock[0]
        request = Request(job.premium, told_s)
        if number >= WARM_UP:
            outcomes = []
            for _ in range(samples):
                future = still_to_come(trace, number, arrived_at, rng)
                outcomes.append(play_forward(replay, job.object_id, future, rng) - arrived_at)
                _clock[0] = arrived_at
            request.reachable = {error: most_within(outcomes, error) for error in TARGETS}
        requests[job.object_id] = (request, arrived_at)
    return [request for request, _ in requests.values() if request.reachable is not None]


def shares(requests: list[Request]) -> tuple[str, str]:
    """(the fewest missed by any estimate, those this server's estimate missed), per error."""
    floor, ours = [], []
    for error in TARGETS:
        assert all(r.reachable is not None for r in requests)
        floor.append(sum(1 - r.reachable[error] for r in requests) / len(requests))  # type: ignore[index]
        ours.append(sum(abs(r.told_s - r.outcome_s) > error * r.outcome_s for r in requests) / len(requests))
    return " / ".join(f"{share:5.1%}" for share in floor), " / ".join(f"{share:5.1%}" for share in ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="11-13", help="a seed or a range, e.g. 11-18")
    parser.add_argument("--samples", type=int, default=30, help="copies played forward per request")
    args = parser.parse_args()
    time.monotonic = lambda: _clock[0]  # the replay's clock, for everything in this process
    requests = [r for seed in seeds_of(args.seeds) for r in replay_with_floor(seed, args.samples)]
    allowed = " / ".join(f"{share:5.1%}" for share in TARGETS.values())
    print(
        f"share of requests whose `queued` estimate is off by more than {' / '.join(map(str, TARGETS))}, "
        f"seeds {args.seeds}, {args.samples} samples each (the targets allow {allowed})"
    )
    print(f"{'':10} {'any estimate, at least':>26} {'this server':>26}")
    for group, picked in {
        "all": requests,
        "premium": [r for r in requests if r.premium],
        "general": [r for r in requests if not r.premium],
    }.items():
        floor, ours = shares(picked)
        print(f"{group:10} {floor:>26} {ours:>26}   (n={len(picked)})")


if __name__ == "__main__":
    main()
