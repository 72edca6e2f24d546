"""Waiting requests give up at their deadline, watched by one timer however many wait."""

from __future__ import annotations

import time

from app.engine.expiry import COMPACT_SLACK, ExpiryLine
from bench.bots import wait_until


class Requests:
    """The scheduler's side: which requests still wait, and until when."""

    def __init__(self) -> None:
        self.deadlines: dict[str, float] = {}
        self.expired: list[str] = []
        self.line = ExpiryLine(
            self.expire, lambda oid, deadline: self.deadlines.get(oid) == deadline, lambda: len(self.deadlines)
        )

    def wait(self, object_id: str, seconds: float) -> None:
        self.deadlines[object_id] = time.time() + seconds
        self.line.add(object_id, self.deadlines[object_id])

    def finish(self, object_id: str) -> None:
        del self.deadlines[object_id]

    def expire(self, object_id: str) -> None:
        self.expired.append(object_id)
        del self.deadlines[object_id]


async def test_requests_expire_in_deadline_order_and_finished_ones_never():
    requests = Requests()
    requests.wait("late", 0.3)
    requests.wait("early", 0.1)
    requests.wait("done before its deadline", 0.05)
    requests.wait("middle", 0.2)
    requests.finish("done before its deadline")
    await wait_until(lambda: "late" in requests.expired)
    # The finished one's deadline came first: had it expired, it would be listed by now.
    assert requests.expired == ["early", "middle", "late"]


async def test_a_request_queued_past_its_deadline_expires_at_once():
    requests = Requests()
    requests.wait("restarted after an hour", -3600)
    await wait_until(lambda: requests.expired)
    assert requests.expired == ["restarted after an hour"]


async def test_finished_requests_do_not_pile_up_in_the_line():
    requests = Requests()
    for number in range(20 * COMPACT_SLACK):
        requests.wait(f"r{number}", 3600)
        requests.finish(f"r{number}")
    assert len(requests.line) <= 2 * COMPACT_SLACK + 1
    requests.line.close()


async def test_after_close_nothing_expires():
    requests = Requests()
    requests.wait("at shutdown", 0.05)
    assert requests.line.armed
    requests.line.close()
    assert not requests.line.armed  # no timer left to fire
