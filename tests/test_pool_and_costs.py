"""How the balancer sizes a job and learns a GPU: the cost model and a backend's learned speed
and circuit breaker, without sockets (pure bookkeeping)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from app.backends.base import Backend, BackendSpec
from app.domain.costs import REFERENCE_UNITS_PER_S, initial_units_per_s, payload_cost_units
from app.domain.jobs import ExecutorType, GenType, Job
from app.engine.estimates import ETA_REFRESH_CHUNK, BurstReading, Estimates
from app.engine.placement import PASSED_OVER_LIMIT, PLACEMENT_WINDOW, next_placement, where_done_first
from app.engine.pool import BackendSlot, BackendState, ExecutorPool
from tests.conftest import new_job

A1111, KANDINSKY = ExecutorType.AUTOMATIC1111, ExecutorType.KANDINSKY


def cost(payload: dict, gen_type: GenType = GenType.TEXT2IMG, executor: ExecutorType = A1111) -> float:
    return payload_cost_units(executor, gen_type, payload)


def test_a_job_costs_steps_times_pixels_times_images():
    base = cost({"steps": 20, "width": 512, "height": 512})
    assert base == 20 * 512 * 512
    assert cost({"steps": 40, "width": 512, "height": 512}) == 2 * base
    assert cost({"steps": 20, "width": 1024, "height": 1024}) == 4 * base
    assert cost({"steps": 20, "width": 512, "height": 512, "n_iter": 2, "batch_size": 3}) == 6 * base


def test_left_out_fields_cost_what_the_backend_would_do_by_default():
    assert cost({"prompt": "p"}) == 50 * 512 * 512  # AUTOMATIC1111's 50 steps at 512 px
    assert cost({"prompt": "p"}, executor=KANDINSKY) == 30 * 512 * 512
    assert cost({"steps": None, "width": None}) == cost({})


def test_img2img_costs_its_denoised_share_and_hires_adds_a_second_pass():
    full = cost({"steps": 20}, GenType.IMG2IMG)
    assert cost({"steps": 20, "denoising_strength": 0.5}, GenType.IMG2IMG) == pytest.approx(full / 2)
    plain = cost({"steps": 20, "width": 512, "height": 512})
    hires = cost({"steps": 20, "width": 512, "height": 512, "enable_hr": True, "hr_scale": 2})
    assert hires == pytest.approx(plain + 20 * 1024 * 1024)


def test_a_new_gpu_starts_from_its_stated_speed_or_its_name():
    assert initial_units_per_s("", 2.0) == 2 * REFERENCE_UNITS_PER_S
    assert initial_units_per_s("NVIDIA RTX 4090", None) > initial_units_per_s("RTX 3060", None)
    assert initial_units_per_s("some unknown card", None) == REFERENCE_UNITS_PER_S


def slot(speed_hint: float | None = None) -> BackendSlot:
    spec = BackendSpec(name="gpu", exec_type=A1111, endpoint="http://127.0.0.1:1", speed=speed_hint)
    return BackendSlot.for_backend(Backend(spec, session=None))  # type: ignore[arg-type]


def test_a_wrong_seed_is_forgotten_after_a_few_jobs():
    gpu = slot(speed_hint=4.0)  # said to be 4x the reference; it is really 1x
    true_speed = REFERENCE_UNITS_PER_S
    gpu.record_success(true_speed * 10, 10.0)
    assert gpu.units_per_s == pytest.approx(true_speed)  # the first job counts whole
    for _ in range(10):
        gpu.record_success(true_speed * 10 * 1.1, 10.0)  # 10 % faster lately
    assert gpu.units_per_s == pytest.approx(true_speed * 1.1, rel=0.01)
    assert gpu.expected_s(true_speed * 11) == pytest.approx(10.0, rel=0.01)


def test_the_breaker_opens_after_failures_in_a_row_and_sits_out_longer_each_time():
    gpu = slot()
    gpu.probed = gpu.up = True
    options = {"backend_is_down": False, "breaker_failures": 3, "max_cooldown_s": 60.0}
    assert not gpu.record_failure("HTTP 500", **options)
    gpu.record_success(REFERENCE_UNITS_PER_S, 1.0)  # a success in between resets the count
    assert not gpu.record_failure("HTTP 500", **options)
    assert not gpu.record_failure("HTTP 500", **options)
    assert gpu.record_failure("HTTP 500", **options)
    assert gpu.state is BackendState.UNHEALTHY and gpu.last_error == "HTTP 500"
    first_cooldown = gpu.cooldown_s
    gpu.up = True  # its probe answered again, but its jobs keep failing
    assert gpu.record_failure("HTTP 500", **options)
    assert gpu.cooldown_s == 2 * first_cooldown


def test_an_unreachable_backend_is_taken_out_at_once():
    gpu = slot()
    gpu.probed = gpu.up = True
    assert gpu.record_failure("connection refused", backend_is_down=True, breaker_failures=3, max_cooldown_s=60.0)
    assert not gpu.in_service


def busy_slot(name: str, units_per_s: float, remaining_s: float) -> BackendSlot:
    gpu = slot()
    gpu.backend = Backend(BackendSpec(name=name, exec_type=A1111, endpoint="http://127.0.0.1:1"), session=None)  # type: ignore[arg-type]
    gpu.units_per_s = units_per_s
    gpu.job = job_of(units_per_s * remaining_s)
    gpu.started_monotonic = time.monotonic()
    return gpu


def job_of(units: float) -> Job:
    return new_job(object_id=f"{int(units):024x}"[-24:], executor=A1111, payload={}, cost_units=units)


def test_a_job_goes_where_it_is_done_first_with_a_margin_for_starting_now():
    free_s, speeds = [0.0, 1.0], [1.0, 4.0]  # a slow GPU free now, a 4x one free in 1 s
    assert where_done_first(free_s, speeds, 40.0) == 1  # 11 s on the fast one, 40 s on the slow
    assert where_done_first(free_s, speeds, 0.5) == 0  # 0.5 s now beats 1.125 s
    assert where_done_first(free_s, speeds, 1.2) == 0  # 1.2 s now; 1.3 s is not sooner
    assert where_done_first(free_s, speeds, 4.0) == 1  # 2 s beats 4 s by far more than the margin
    assert where_done_first([0.0, 0.0], speeds, 1.0) == 1  # both free: the fast one


def idle_pool(*slots: BackendSlot, ratio: tuple[int, int] = (1, 3)) -> ExecutorPool:
    pool = ExecutorPool(A1111, ratio)
    for gpu in slots:
        gpu.up = gpu.probed = True
        pool.slots.append(gpu)
    return pool


def queue_jobs(pool: ExecutorPool, *jobs: Job) -> None:
    for job in jobs:
        pool.queue.push(job)
        pool.note_arrival(job)  # just arrived: a line being fed, kept in its order


def run_on(gpu: BackendSlot, job: Job) -> None:
    gpu.job, gpu.started_monotonic = job, time.monotonic()


def test_a_large_job_waits_a_moment_for_the_fast_gpu_while_a_small_one_takes_the_slow_one():
    slow, fast = busy_slot("slow", 1.0, 0.0), busy_slot("fast", 4.0, 1.0)  # the fast one frees in 1 s
    slow.job = None
    pool = idle_pool(slow, fast)
    large, small, second_large = job_of(40.0), job_of(2.0), job_of(40.1)
    queue_jobs(pool, large, small, second_large)

    # The large job counts on the fast GPU (11 s against 40 s); the small one behind it
    # would wait until 11.5 s there, so it takes the slow one now.
    assert next_placement(pool) == (small, slow)
    run_on(slow, small)
    # The second large job is done sooner after the first on the fast GPU (21 s) than after
    # the small one on the slow GPU (42 s): nothing starts.
    assert next_placement(pool) is None

    fast.free()
    assert next_placement(pool) == (large, fast)


def test_a_large_job_passed_by_many_small_ones_still_waits_for_the_fast_gpu_but_not_forever():
    slow, fast = busy_slot("slow", 1.0, 0.0), busy_slot("fast", 4.0, 1.0)  # the fast one frees in 1 s
    slow.job = None
    pool = idle_pool(slow, fast)
    large = job_of(40.0)  # 11 s on the fast GPU, 40 s on the slow one
    queue_jobs(pool, large)

    def small_job_passes() -> None:
        small = job_of(0.5)
        queue_jobs(pool, small)
        assert next_placement(pool) == (small, slow)
        slow.free()

    # Small jobs arriving behind it take the slow GPU, one after another; the large job keeps
    # counting on the fast one, well past the placement window...
    for _ in range(PLACEMENT_WINDOW + 1):
        small_job_passes()
    assert next_placement(pool) is None
    # ...up to the limit on passes, after which it takes the first free backend: its wait
    # for a better one cannot go on for ever.
    for _ in range(PASSED_OVER_LIMIT - PLACEMENT_WINDOW - 1):
        small_job_passes()
    assert large.passed_over == PASSED_OVER_LIMIT
    assert next_placement(pool) == (large, slow)


def test_a_job_further_back_than_the_window_takes_a_free_backend_at_once():
    slow, fast = busy_slot("slow", 1.0, 0.0), busy_slot("fast", 100.0, 0.1)  # the fast one frees in 0.1 s
    slow.job = None
    pool = idle_pool(slow, fast)
    # Every job would be done sooner on the fast GPU after those ahead of it (0.1 s + 0.01 s
    # each) than on the slow one (1 s), but only the first PLACEMENT_WINDOW may wait for it.
    jobs = [job_of(1.0 + index / 100) for index in range(PLACEMENT_WINDOW + 2)]
    queue_jobs(pool, *jobs)
    placed, gpu = next_placement(pool)
    assert gpu is slow and placed is jobs[PLACEMENT_WINDOW]


def test_a_later_arrival_does_not_take_the_fast_gpu_a_waiting_premium_job_counts_on():
    slow, fast = busy_slot("slow", 1.0, 0.0), busy_slot("fast", 4.0, 0.1)  # the fast one frees in 0.1 s
    slow.job = None
    pool = idle_pool(slow, fast, ratio=(3, 1))  # the general line's turn comes first
    first_general, premium, later_general = job_of(4.0), job_of(2.0), job_of(4.1)
    premium.premium = True
    queue_jobs(pool, first_general, premium, later_general)
    # In dispatch order: the first general job counts on the fast GPU (done at 1.1 s), the
    # premium one after it (1.6 s, against 2 s on the slow GPU now), and the later general job
    # then finds the fast GPU taken until 1.6 s. Nothing is better off on the slow GPU now:
    # the premium job is not pushed there by the general job that came after it.
    assert next_placement(pool) is None


def test_an_estimate_ends_with_the_time_results_lately_took_to_reach_their_clients():
    gpu = busy_slot("gpu", 1.0, 0.0)
    gpu.job = None  # free now, 1 unit per second
    pool = idle_pool(gpu)
    assert pool.eta_for_new(False, 2.0) == pytest.approx(2.0, abs=0.02)
    for _ in range(50):  # each image took 0.5 s from its backend's answer to its final answer
        pool.note_finishing(0.5)
    assert pool.eta_for_new(False, 2.0) == pytest.approx(2.5, abs=0.02)
    queue_jobs(pool, job_of(3.0))
    assert [round(eta_s, 1) for _, eta_s in pool.waiting_estimates(5)] == [3.5]


def test_with_exact_speeds_and_no_arrivals_every_estimate_is_what_the_dispatcher_then_does():
    """The estimates run the dispatcher forward (app/engine/forecast.py). Here the dispatcher
    itself is then run on a clock of its own, each job taking exactly its cost over its GPU's
    speed: every job must end when its estimate said."""
    rng = random.Random(7)
    gpus = [busy_slot(f"gpu-{speed}x-{n}", speed, rng.uniform(0.0, 2.0)) for n, speed in enumerate((1, 1, 2, 4))]
    pool = idle_pool(*gpus)
    # 16 general and 8 premium jobs, mixed: within the forecast's reach (4 jobs per backend of
    # each class; a longer line's far end is estimated by a shortcut).
    waiting = [
        new_job(executor=A1111, payload={}, cost_units=rng.choice((2.0, 4.5, 8.0, 16.0)), premium=n % 3 == 0)
        for n in range(24)
    ]
    for job in waiting:
        pool.queue.push(job)
    # One arrival noted: the line is being fed (so its tail is not reordered largest first),
    # and no rate is known from a single arrival (so none is expected to pass).
    pool.note_arrival(waiting[-1])
    before = time.monotonic()
    estimates = {job.object_id: eta_s for job, eta_s in pool.waiting_estimates(len(waiting))}
    took_s = time.monotonic() - before  # the estimates' "now" is within this of `before`

    done_at = simulate_dispatch(pool, clock_zero=before)
    for job in waiting:
        assert estimates[job.object_id] == pytest.approx(done_at[job.object_id], abs=took_s + 1e-9), job


@pytest.mark.parametrize("premium", [False, True])
def test_a_new_request_is_told_when_the_dispatcher_will_have_done_it(premium: bool):
    rng = random.Random(3)
    gpus = [busy_slot(f"gpu-{speed}x-{n}", speed, rng.uniform(0.0, 2.0)) for n, speed in enumerate((1, 1, 2, 4))]
    pool = idle_pool(*gpus, ratio=(3, 1))  # the general line's turn comes first
    for n in range(6):
        pool.queue.push(
            new_job(executor=A1111, payload={}, cost_units=rng.choice((2.0, 8.0, 16.0)), premium=n % 2 == 0)
        )
    newcomer = new_job(executor=A1111, payload={}, cost_units=8.0, premium=premium)
    before = time.monotonic()
    told_s = pool.eta_for_new(premium, newcomer.cost_units)
    took_s = time.monotonic() - before
    pool.queue.push(newcomer)
    pool.note_arrival(newcomer)  # a line being fed: no largest-first tail
    assert told_s == pytest.approx(simulate_dispatch(pool, clock_zero=before)[newcomer.object_id], abs=0.005 + took_s)


def test_requests_answered_together_are_told_what_each_would_be_told_alone():
    """A burst's requests are estimated against one reading of the backends (BurstReading):
    each must be told what it would be told with the backends read for it alone, from the
    first requests of the burst (the forecast) to those far back (the replay's shortcut)."""
    rng = random.Random(5)
    gpus = [busy_slot(f"gpu-{speed}x-{n}", speed, rng.uniform(0.5, 3.0)) for n, speed in enumerate((1, 2, 4))]
    pool = idle_pool(*gpus)
    estimates = Estimates({A1111: pool}, lambda job, eta_s: None)
    burst = BurstReading()
    read_at = time.monotonic()
    for n in range(60):
        job = new_job(executor=A1111, payload={}, cost_units=rng.choice((2.0, 8.0, 16.0)), premium=n % 4 == 0)
        alone_s = estimates.for_new(job)
        in_burst_s = estimates.for_new(job, burst)
        # The reading is older by the time since it was taken: busy backends seemed that much
        # further from free (and the estimates are rounded to 10 ms).
        assert in_burst_s == pytest.approx(alone_s, abs=time.monotonic() - read_at + 0.011), n
        queue_jobs(pool, job)


def test_far_back_in_a_long_line_a_request_is_told_the_work_ahead_of_it_over_the_speed():
    gpu = busy_slot("gpu", 2.0, 3.0)  # 2 units per second, its job done in 3 s
    pool = idle_pool(gpu)
    estimates = Estimates({A1111: pool}, lambda job, eta_s: None)
    burst, units_ahead = BurstReading(), 0.0
    read_at = time.monotonic()
    # The forecast, then the replay's shortcut, then the work spread over the pool: jobs of
    # one size, since the shortcut counts those it does not place one by one at the line's
    # mean size.
    for n in range(100):
        job = new_job(executor=A1111, payload={}, cost_units=8.0)
        expected_s = 3.0 + (units_ahead + job.cost_units) / 2.0
        for told_s in (estimates.for_new(job), estimates.for_new(job, burst)):
            assert told_s == pytest.approx(expected_s, abs=time.monotonic() - read_at + 0.011), n
        queue_jobs(pool, job)
        units_ahead += job.cost_units


def simulate_dispatch(pool: ExecutorPool, clock_zero: float) -> dict[str, float]:
    """Run the dispatcher (next_placement) until the line is empty, on a virtual clock that
    starts at `clock_zero` (time.monotonic): each job ends at its start + cost / speed.
    Returns each job's end, in seconds from `clock_zero`. The slots' start times are kept as
    the real clock would show them at that virtual moment."""
    started_at = {id(gpu): gpu.started_monotonic - clock_zero for gpu in pool.slots}  # virtual
    done_at: dict[str, float] = {}
    now = 0.0
    while True:
        for gpu in pool.slots:  # the real clock as it would read at `now`
            gpu.started_monotonic = time.monotonic() - (now - started_at[id(gpu)])
        while (placed := next_placement(pool)) is not None:
            job, gpu = placed
            gpu.job, started_at[id(gpu)] = job, now
            gpu.started_monotonic = time.monotonic()
        busy = [gpu for gpu in pool.slots if gpu.job is not None]
        if not busy:
            return done_at
        first = min(busy, key=lambda gpu: started_at[id(gpu)] + gpu.job.cost_units / gpu.units_per_s)
        now = started_at[id(first)] + first.job.cost_units / first.units_per_s
        done_at[first.job.object_id] = now
        first.job = None


def test_only_the_end_of_a_backlog_is_taken_largest_first():
    pool = idle_pool(busy_slot("a", 1.0, 5.0), busy_slot("b", 1.0, 5.0))
    serving = pool.in_service()
    jobs = [new_job(executor=A1111, payload={}, cost_units=float(n + 1)) for n in range(8)]
    # A short line in a steady flow (2 per backend, never more) keeps its order, though
    # nothing has arrived for a while: its estimates assumed that order.
    for job in jobs[:4]:
        pool.queue.push(job)
    assert pool.draining(serving) and not pool.largest_first(serving)
    # A backlog of 4 per backend that runs down to 2 per backend: its tail goes largest first.
    for job in jobs[4:]:
        pool.queue.push(job)
    assert not pool.largest_first(serving)  # still 4 per backend waiting
    for job in jobs[:4]:
        pool.queue.take(job)
    assert pool.largest_first(serving)
    # Once the line has been empty, the next short line is a short line again.
    for job in jobs[4:]:
        pool.queue.take(job)
    pool.queue.push(jobs[0])
    assert not pool.largest_first(serving)


async def test_a_long_line_is_re_estimated_a_chunk_per_turn_of_the_event_loop():
    # 250 requests wait behind a busy GPU; each was told long ago an estimate that is far off now,
    # so each is to be told a new one. Revising them all in one stretch would hold up every
    # connection meanwhile.
    pool = idle_pool(busy_slot("gpu", 1.0, 5.0))
    waiting = [new_job(executor=A1111, payload={}, cost_units=2.0) for _ in range(250)]
    queue_jobs(pool, *waiting)
    for job in waiting:
        job.eta_due = time.monotonic() + 1e6
    told: list[Job] = []
    estimates = Estimates({A1111: pool}, lambda job, eta_s: told.append(job))

    revising = asyncio.create_task(estimates.revise(pool))
    await asyncio.sleep(0)
    assert told == waiting[:ETA_REFRESH_CHUNK]  # one chunk, then the loop was free
    await revising
    assert told == waiting  # each told once, in the order they will run
