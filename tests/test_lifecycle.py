"""A request's phases, without sockets: each transition checks where it comes from, the first
path to finish a request wins and every later one backs off, and finishing cancels its timers."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.domain.lifecycle import Phase, TrackedRequest, WrongPhase
from tests.conftest import new_job


def tracked_request() -> TrackedRequest:
    return TrackedRequest(new_job())


async def idle() -> None:
    await asyncio.sleep(0)


async def test_a_request_goes_queued_running_retry_wait_queued_finishing_done():
    request = tracked_request()
    task = asyncio.create_task(idle())
    request.start(slot=object(), task=task)  # type: ignore[arg-type]
    assert request.phase is Phase.RUNNING and request.slot is not None
    request.leave_slot()
    request.wait_retry()
    request.set_retry_timer(asyncio.get_running_loop().call_later(60, lambda: None))
    request.back_in_line()
    assert (request.phase, request.retry_timer) == (Phase.QUEUED, None)
    assert request.begin_finish()
    request.done()
    assert request.phase is Phase.DONE
    await task


async def test_only_the_first_path_finishes_a_request():
    request = tracked_request()
    assert request.begin_finish(cancelled=True)  # say, a cancel
    assert not request.begin_finish()  # the backend's answer, a moment later
    assert request.cancelled and request.phase is Phase.FINISHING


async def test_finishing_cancels_the_retry_timer_and_the_expiry():
    request = tracked_request()
    loop = asyncio.get_running_loop()
    request.start(slot=object(), task=asyncio.create_task(idle()))  # type: ignore[arg-type]
    request.wait_retry()
    retry = loop.call_later(60, lambda: None)
    request.set_retry_timer(retry)
    request.expires_at = time.time() + 60
    request.begin_finish()
    assert retry.cancelled()
    assert request.retry_timer is None and request.expires_at is None


@pytest.mark.parametrize("transition", ["wait_retry", "back_in_line", "done"])
async def test_a_transition_from_the_wrong_phase_is_refused(transition):
    request = tracked_request()  # queued
    with pytest.raises(WrongPhase):
        getattr(request, transition)()
    assert request.phase is Phase.QUEUED


async def test_a_finished_request_cannot_be_started_or_retried():
    request = tracked_request()
    request.begin_finish()
    with pytest.raises(WrongPhase):
        request.start(slot=object(), task=asyncio.create_task(idle()))  # type: ignore[arg-type]
    with pytest.raises(WrongPhase):
        request.set_retry_timer(asyncio.get_running_loop().call_later(60, lambda: None))
