"""The weighted line of one executor type, on its own: ratio, order, passing over, cost sum."""

from __future__ import annotations

import random
import time

import pytest

from app.domain.jobs import ExecutorType, GenType, Job
from app.engine.queues import WeightedQueue


def job(name: str, premium: bool, cost: float = 1.0) -> Job:
    made = Job(
        object_id=name,
        service="s",
        executor=ExecutorType.KANDINSKY,
        gen_type=GenType.TEXT2IMG,
        premium=premium,
        settings={},
        service_info={},
        payload={},
        created_at=time.time(),
    )
    made.cost_units = cost
    return made


def drain(queue: WeightedQueue) -> list[str]:
    taken = []
    while (next_job := queue.pop()) is not None:
        taken.append(next_job.object_id)
    return taken


def test_ratio_1_3_repeats_p_p_g_p_while_both_wait():
    queue = WeightedQueue(1, 3)
    for index in range(3):
        queue.push(job(f"g{index}", False))
    for index in range(9):
        queue.push(job(f"p{index}", True))
    assert drain(queue) == ["p0", "p1", "g0", "p2", "p3", "p4", "g1", "p5", "p6", "p7", "g2", "p8"]


def test_an_empty_class_banks_no_credit():
    queue = WeightedQueue(1, 3)
    for index in range(4):
        queue.push(job(f"g{index}", False))
    assert [queue.pop().object_id for _ in range(4)] == ["g0", "g1", "g2", "g3"]
    for index in range(4):
        queue.push(job(f"p{index}", True))
        queue.push(job(f"h{index}", False))
    # General was served alone for a while; it gets no burst now that premium is back.
    assert [j[0] for j in drain(queue)][:4].count("h") == 1


def test_a_passed_over_job_keeps_its_place_and_costs_add_up():
    queue = WeightedQueue(1, 1)
    first, second, third = job("a", False, 5), job("b", False, 7), job("c", False, 11)
    for item in (first, second, third):
        queue.push(item)
    assert queue.waiting_units == 23
    assert queue.pop(accept=lambda j: j.object_id != "a").object_id == "b"
    assert queue.waiting_units == 16
    assert queue.remove(third) and not queue.remove(third)
    queue.push_front(job("r", False, 2))
    assert drain(queue) == ["r", "a"] and queue.waiting_units == 0


def test_picks_before_a_new_job_follow_the_ratio():
    queue = WeightedQueue(1, 3)
    for index in range(6):
        queue.push(job(f"g{index}", False))
    for index in range(6):
        queue.push(job(f"p{index}", True))
    # From fresh credits the order is P P G P, repeating: a new premium job (the 7th) waits
    # for the 6 premium ahead and the 2 general picked among them.
    assert queue.picks_before_new(True) == 8
    # A new general job waits for the 6 general ahead and all 6 premium (3 per general).
    assert queue.picks_before_new(False) == 12


@pytest.mark.parametrize("ratio", [(1, 3), (2, 3), (3, 1), (1, 1), (0, 1), (1, 0)])
def test_the_count_ahead_of_a_new_job_is_what_the_dispatcher_then_takes_before_it(ratio):
    """Whatever the round-robin's credits when a job arrives, the estimate counts exactly
    the jobs popped before it."""
    rng = random.Random(5)
    for _ in range(200):
        queue = WeightedQueue(*ratio)
        for index in range(rng.randint(0, 12)):
            queue.push(job(f"w{index}", rng.random() < 0.5))
        for _ in range(rng.randint(0, 6)):  # move the credits somewhere along the cycle
            queue.pop()
        premium = rng.random() < 0.5
        expected = queue.picks_before_new(premium)
        queue.push(job("new", premium))
        assert drain(queue).index("new") == expected


def test_an_arrival_during_the_backlog_read_waits_behind_the_unread_requests_of_its_class():
    queue = WeightedQueue(1, 1)
    queue.set_unread(False, 2)  # two stored general requests are not read back yet
    queue.push(job("new-general", False))
    queue.push(job("new-premium", True))  # premium has no backlog: it goes at once
    assert queue.waiting(False) == 3 and queue.picks_before_new(False) == 4
    assert queue.pop().object_id == "new-premium"
    assert queue.pop() is None  # the general newcomer may not pass the unread two
    queue.push_backlog(job("stored-1", False))
    queue.set_unread(False, 1)
    assert queue.pop().object_id == "stored-1"
    queue.push_backlog(job("stored-2", False))
    queue.set_unread(False, 0)
    assert drain(queue) == ["stored-2", "new-general"]


def test_placement_takes_the_largest_of_the_first_few_but_passes_a_job_over_at_most_that_often():
    queue = WeightedQueue(1, 3)
    queue.push(job("small", False, 1))
    for index in range(20):
        queue.push(job(f"big{index}", False, 10 + index % 3))
    taken = [queue.pop(largest_within=4).object_id for _ in range(5)]
    # Each pick takes the largest of the first 4; "small" is passed 4 times, then goes next.
    assert taken == ["big2", "big1", "big4", "big5", "small"]


def test_placement_keeps_the_class_ratio():
    queue = WeightedQueue(1, 3)
    for index in range(4):
        queue.push(job(f"g{index}", False, index))
        queue.push(job(f"p{index}", True, index))
    classes = [queue.pop(largest_within=8).object_id[0] for _ in range(4)]
    assert classes == ["p", "p", "g", "p"]
