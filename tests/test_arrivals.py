"""What the estimates learn of the requests still to come: how many of the premium requests
that arrive while a general one waits really get past it (pure bookkeeping, no sockets)."""

from __future__ import annotations

import pytest

from app.domain.jobs import Job
from app.engine.arrivals import PASSING_MIN_ARRIVALS, Arrivals
from tests.conftest import new_job

ROOM = 10  # the ratio leaves room for this many premium requests to pass


def general() -> Job:
    return new_job(premium=False, cost_units=1.0)


def premium() -> Job:
    return new_job(premium=True, cost_units=1.0)


def test_until_enough_is_seen_every_arrival_is_assumed_to_pass():
    arrivals = Arrivals()
    assert arrivals.passing_share(premium=False) == 1.0
    waiting = general()
    arrivals.arrived(waiting, ROOM)
    later = premium()
    arrivals.arrived(later, ROOM)
    arrivals.started(later)
    arrivals.started(waiting)
    assert PASSING_MIN_ARRIVALS > 1
    assert arrivals.passing_share(premium=False) == 1.0


def test_of_two_premium_requests_arriving_while_a_general_one_waits_one_passes_it():
    arrivals = Arrivals()
    for _ in range(10):
        waiting = general()
        arrivals.arrived(waiting, ROOM)
        first, second = premium(), premium()
        arrivals.arrived(first, ROOM)
        arrivals.arrived(second, ROOM)
        arrivals.started(first)  # got a backend before the general request
        arrivals.started(waiting)
        arrivals.started(second)  # after it: it did not pass
    assert arrivals.passing_share(premium=False) == pytest.approx(0.5)
    # The premium requests saw no general arrivals while they waited: nothing learned there.
    assert arrivals.passing_share(premium=True) == 1.0


def test_arrivals_beyond_the_room_the_ratio_leaves_are_not_counted():
    arrivals = Arrivals()
    for _ in range(10):
        waiting = general()
        arrivals.arrived(waiting, room=1)  # the ratio lets one premium request pass, no more
        late = [premium() for _ in range(3)]
        for job in late:
            arrivals.arrived(job, ROOM)
        arrivals.started(late[0])
        arrivals.started(waiting)
        for job in late[1:]:
            arrivals.started(job)
    # One could pass and one did: all that could, did.
    assert arrivals.passing_share(premium=False) == 1.0


def test_a_retried_request_is_counted_once_and_a_read_back_backlog_not_at_all():
    arrivals = Arrivals()
    from_backlog = general()  # read back at start-up: it never "arrived" in this run
    arrivals.started(from_backlog)
    for _ in range(10):
        waiting = general()
        arrivals.arrived(waiting, ROOM)
        passer = premium()
        arrivals.arrived(passer, ROOM)
        arrivals.started(waiting)  # nothing passed it
        arrivals.started(passer)
        arrivals.started(waiting)  # a retry after a failed attempt: not a second wait
    assert arrivals.passing_share(premium=False) == 0.0
