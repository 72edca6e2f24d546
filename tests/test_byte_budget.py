"""The budget that bounds large messages in flight: a connection whose image does not fit
waits its turn, in arrival order, and nothing is lost when a waiting connection goes away."""

from __future__ import annotations

import asyncio

from app.web.byte_budget import ByteBudget


async def test_a_message_that_does_not_fit_waits_until_earlier_ones_are_committed():
    budget = ByteBudget(10)
    first = await budget.take(6)
    waiting = asyncio.create_task(budget.take(6))
    await asyncio.sleep(0)
    assert not waiting.done() and budget.used == 6
    budget.give(first)
    assert await waiting == 6 and budget.used == 6


async def test_waiters_are_served_in_arrival_order_and_a_huge_message_passes_alone():
    budget = ByteBudget(10)
    held = await budget.take(10)
    order: list[str] = []

    async def wait(name: str, size: int) -> int:
        taken = await budget.take(size)
        order.append(name)
        return taken

    huge = asyncio.create_task(wait("huge", 50))  # larger than the whole budget
    small = asyncio.create_task(wait("small", 1))
    await asyncio.sleep(0)
    budget.give(held)
    assert await huge == 10 and order == ["huge"]  # it holds the whole budget, alone
    budget.give(10)
    assert await small == 1 and order == ["huge", "small"]


async def test_a_connection_that_goes_away_while_waiting_takes_nothing_with_it():
    budget = ByteBudget(10)
    held = await budget.take(8)
    gone = asyncio.create_task(budget.take(5))
    after = asyncio.create_task(budget.take(5))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    budget.give(held)
    assert await after == 5 and budget.used == 5
