"""How true the `queued` estimate (`avg_time`) is: a seeded, replayable trace on 4 fake
AUTOMATIC1111 backends of speeds 1x, 1x, 2x, 4x (generation time = cost / speed, +-10 % noise),
Poisson arrivals at 85 % load with mixed sizes and 25 % premium, then a burst of 60.

For every request: the relative error |told - actual| / actual, where `told` is the avg_time
of its `queued` answer and `actual` the time from sending it to its final answer. Printed as
median / p90 / p99 for all, premium and general requests after warm-up (the first 20), for
the warm-up alone, and for the first 10 requests after a restart on the same database (speeds
learned before it); beside them, the original product's method computed on the same run (mean
of the last 8 generation durations x requests waiting at arrival / live backends; its 4 s floor
is scaled with the trace's time scale).

Times are scaled down (a 512x512, 30-step job takes about 0.3 s on the 1x backend) so a run
takes about a minute.

Usage: .venv/bin/python -m bench.estimates [--arrivals 400] [--burst 60] [--seed 11] [--premium-share 0.25]
       [--cool-down 150]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from app.domain.costs import payload_cost_units
from app.domain.jobs import ExecutorType, GenType
from bench.core import KEY, balancer, quantile

SPEEDS = {"gpu-1x-a": 1.0, "gpu-1x-b": 1.0, "gpu-2x": 2.0, "gpu-4x": 4.0}
SIZES = [(512, 512), (768, 768), (1024, 1024), (512, 768)]
LOAD = 0.85
PREMIUM_SHARE = 0.25
NOISE = 0.10
# Units per second of the 1x backend: a 512x512, 30-step job takes 0.3 s there.
BASE_UNITS_PER_S = 512 * 512 * 30 / 0.3
# The original's 4 s floor, in this trace's time scale (a real 1x GPU: about 10 s for that job).
ORIGINAL_FLOOR_S = 4.0 * 0.3 / 10


@dataclass
class Sent:
    premium: bool
    cost: float
    sent_at: float = 0.0
    told_s: float | None = None
    original_s: float | None = None
    generating_at: float | None = None
    final_at: float | None = None
    burst: bool = False
    cool_down: bool = False  # after the trace, keeping the flow going: not measured
    warm_up: bool = False
    after_restart: bool = False


@dataclass
class Trace:
    requests: list[tuple[float, dict, bool]] = field(default_factory=list)  # (offset s, payload, premium)
    arrivals_per_s: float = 0.0  # the Poisson part's rate
    burst: range = range(0)  # the burst's places in `requests`
    measured: int = 0  # the first this many are measured; those after them only keep the flow going


def build_trace(
    arrivals: int,
    burst: int,
    seed: int,
    premium_share: float = PREMIUM_SHARE,
    burst_after: int | None = None,
    cool_down: int = 0,
) -> Trace:
    """`arrivals` Poisson arrivals at LOAD, then `burst` requests at once a second after the
    last; or, with `burst_after`, the burst a second after that many arrivals, and the rest of
    the flow a second later than it would have been (the same requests either way).

    `cool_down` more arrivals of the same flow follow, not to be measured: without them the
    flow stops dead with the trace, and the estimates of its last requests count on arrivals
    (premium ones passing them) that a flow in service would bring. Drawn apart, so the
    measured requests are the same with or without them."""
    rng = random.Random(seed)
    payloads = []
    for number in range(arrivals + burst):
        payloads.append(draw_payload(rng, number))
    mean_cost = statistics.mean(cost(p) for p in payloads)
    capacity_per_s = BASE_UNITS_PER_S * sum(SPEEDS.values()) / mean_cost
    rate = LOAD * capacity_per_s
    trace, clock = Trace(arrivals_per_s=rate), 0.0
    for payload in payloads[:arrivals]:
        clock += rng.expovariate(rate)
        trace.requests.append((clock, payload, rng.random() < premium_share))
    burst_requests = [(clock + 1.0, payload, rng.random() < premium_share) for payload in payloads[arrivals:]]
    if burst_after is None or burst_after >= arrivals:
        trace.burst = range(arrivals, arrivals + burst)
        trace.requests += burst_requests
    else:
        flow, rest = trace.requests[:burst_after], trace.requests[burst_after:]
        at = flow[-1][0] + 1.0 if flow else 1.0
        trace.burst = range(burst_after, burst_after + burst)
        trace.requests = flow + [(at, p, premium) for _, p, premium in burst_requests]
        trace.requests += [(offset + 1.0, p, premium) for offset, p, premium in rest]
    trace.measured = len(trace.requests)
    later_rng, clock = random.Random(seed + 1_000_000), max(offset for offset, _, _ in trace.requests)
    for number in range(cool_down):
        clock += later_rng.expovariate(rate)
        payload = draw_payload(later_rng, arrivals + burst + number)
        trace.requests.append((clock, payload, later_rng.random() < premium_share))
    return trace


def draw_payload(rng: random.Random, number: int) -> dict:
    """One request of the trace's mix: one of SIZES, 20-50 steps."""
    width, height = rng.choice(SIZES)
    return {"prompt": f"trace {number}", "steps": rng.randint(20, 50), "width": width, "height": height}


def cost(payload: dict) -> float:
    return payload_cost_units(ExecutorType.AUTOMATIC1111, GenType.TEXT2IMG, payload)


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p90, p99 = quantile(ordered, 0.9), quantile(ordered, 0.99)
    return f"median {statistics.median(ordered):5.2f}  p90 {p90:5.2f}  p99 {p99:5.2f}  (n={len(ordered)})"


async def run(trace: Trace, seed: int, warm_up: int, after_restart: int) -> list[Sent]:
    """Play the trace, then restart the server on the same database and play its first
    `after_restart` requests again: those show the estimate of a restart with learned speeds."""
    runners, entries = [], []
    for number, (name, factor) in enumerate(SPEEDS.items()):
        state = DemoBackendState(units_per_s=BASE_UNITS_PER_S * factor, noise=NOISE, noise_seed=seed + number)
        runner, endpoint = await serve_on_loopback(automatic1111_app(state))
        runners.append(runner)
        entries.append({"name": name, "exec_type": "automatic1111", "gpu": "unknown", "endpoint": endpoint})
    records: list[Sent] = []
    durations: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for phase, requests in enumerate((trace.requests, trace.requests[:after_restart])):
                # The same folder both times: the restarted server reads the first run's database.
                server = balancer(Path(tmp), entries, SAVE_IMAGES_LOCALLY="0", PROGRESS_INTERVAL_S="0")
                await server.start()
                try:
                    records += await play(
                        server.base_url,
                        requests,
                        durations,
                        warm_up,
                        restarted=phase == 1,
                        first_id=phase * 100_000,
                        burst=trace.burst,
                        measured=trace.measured,
                    )
                finally:
                    await server.stop()
    finally:
        for runner in runners:
            await runner.cleanup()
    return records


async def play(
    base_url: str,
    requests: list[tuple[float, dict, bool]],
    durations: list[float],
    warm_up: int,
    *,
    restarted: bool,
    first_id: int,
    burst: range,
    measured: int,
) -> list[Sent]:
    """Send `requests` at their offsets and follow each to its final answer."""
    sent: dict[str, Sent] = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"{base_url}/ws/bench", headers={"authorization": KEY, "service": "bench"}, max_msg_size=0
        ) as ws:
            pending: dict[int, Sent] = {}  # request_id -> what was sent, until `queued`

            async def send_all() -> None:
                started = time.monotonic()
                for number, (offset, payload, premium) in enumerate(requests):
                    delay = started + offset - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    waiting = sum(1 for s in sent.values() if s.generating_at is None) + len(pending)
                    record = Sent(
                        premium,
                        cost(payload),
                        burst=not restarted and number in burst,
                        cool_down=number >= measured,
                        warm_up=not restarted and number < warm_up,
                        after_restart=restarted,
                    )
                    recent = durations[-8:]
                    if recent:
                        record.original_s = max(ORIGINAL_FLOOR_S, statistics.mean(recent) * waiting / len(SPEEDS))
                    pending[first_id + number] = record
                    record.sent_at = time.monotonic()
                    await ws.send_json(
                        {
                            "message_type": "request",
                            "executor": "automatic1111",
                            "gen_type": "text2img",
                            "settings": {"premium": int(premium)},
                            "service_info": {"user_id": number, "request_id": first_id + number},
                            "payload": payload,
                        }
                    )

            sender = asyncio.create_task(send_all())
            finished = 0
            while finished < len(requests):
                message = json.loads((await ws.receive()).data)
                status = message.get("gen_status")
                if status == "queued":
                    record = pending.pop(message["service_info"]["request_id"])
                    record.told_s = message["avg_time"]
                    sent[message["object_id"]] = record
                elif status == "generating":
                    sent[message["object_id"]].generating_at = time.monotonic()
                elif status in ("ok", "error"):
                    record = sent[message["object_id"]]
                    record.final_at = time.monotonic()
                    if record.generating_at is not None:
                        durations.append(record.final_at - record.generating_at)
                    finished += 1
            await sender
    return list(sent.values())


def report(records: list[Sent]) -> None:
    def errors(rows: list[Sent], told: str) -> list[float]:
        out = []
        for row in rows:
            value = getattr(row, told)
            actual = row.final_at - row.sent_at
            if value is not None and actual > 0:
                out.append(abs(value - actual) / actual)
        return out

    after = [r for r in records if not r.warm_up and not r.after_restart and not r.cool_down]
    groups = {
        "all": after,
        "premium": [r for r in after if r.premium],
        "general": [r for r in after if not r.premium],
        "burst": [r for r in after if r.burst],
        "warm-up (first 20)": [r for r in records if r.warm_up],
        "first after restart": [r for r in records if r.after_restart],
    }
    print("relative error of the `queued` avg_time vs send -> final")
    for name, rows in groups.items():
        print(f"  {name:20} this server: {percentiles(errors(rows, 'told_s'))}")
        print(f"  {'':20} original:    {percentiles(errors(rows, 'original_s'))}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=400)
    parser.add_argument("--burst", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--premium-share",
        type=float,
        default=PREMIUM_SHARE,
        help="share of premium requests; 0 shows the error left when no request can arrive later and pass another",
    )
    parser.add_argument(
        "--after-restart", type=int, default=10, help="requests replayed after a restart on the same database"
    )
    parser.add_argument(
        "--cool-down",
        type=int,
        default=0,
        help="arrivals of the same flow after the trace, not measured (build_trace); e.g. 150",
    )
    args = parser.parse_args()
    trace = build_trace(args.arrivals, args.burst, args.seed, args.premium_share, cool_down=args.cool_down)
    records = await run(trace, args.seed, warm_up=20, after_restart=args.after_restart)
    report(records)


if __name__ == "__main__":
    asyncio.run(main())
