"""Every final answer reaches one connection of its service, once: however many connections
open together, whether it waited or was sent live; a client that asks for acknowledgements
gets its final again until it acks, across restarts; a repeated request_id is not run twice."""

from __future__ import annotations

import asyncio
import collections

from app import keys
from bench.bots import Bot, request_message, wait_until


async def collect_finals(bot: Bot, seconds: float) -> list[dict]:
    """Every final message that arrives on `bot` within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                await bot.next_message(lambda m: False)
    except TimeoutError:
        pass
    return [m for m in bot.received if m.get("gen_status") in ("ok", "error")]


async def all_final(balancer, ids: list[str]) -> None:
    async def finished() -> bool:
        jobs = [await balancer.app[keys.STORE].reads.get(object_id) for object_id in ids]
        return all(job.status.is_final for job in jobs)

    await wait_until(finished)


async def _delivered(balancer, object_id: str) -> bool:
    return (await balancer.app[keys.STORE].reads.get(object_id)).delivered_at is not None


async def submit_and_leave(balancer, count: int, *, require_ack: int = 0) -> list[str]:
    """A bot sends `count` requests (for as many users) and goes away before any is answered."""
    bot = await balancer.connect("telegram")
    ids = []
    for n in range(count):
        message = request_message("kandinsky", "text2img", {"prompt": f"cat {n}"}, user_id=n)
        message["settings"]["require_ack"] = require_ack
        ids.append((await bot.submit(message))["object_id"])
    await bot.close()
    return ids


async def test_three_connections_opening_together_get_each_waiting_final_once(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    ids = await submit_and_leave(balancer, 20)
    gpu.state.gate.set()
    await all_final(balancer, ids)

    shards = await asyncio.gather(*[balancer.connect("telegram") for _ in range(3)])
    finals = [m for shard in await asyncio.gather(*[collect_finals(s, 1.0) for s in shards]) for m in shard]

    assert collections.Counter(m["object_id"] for m in finals) == collections.Counter(ids)
    assert await balancer.app[keys.STORE].reads.owed_finals("telegram") == []


async def test_a_final_is_sent_once_when_it_finishes_as_connections_open(start_backend, start_balancer):
    """Live delivery and backlog delivery race for the same finals; each goes out once. The
    bot that sent them acknowledges finals (require_ack): the ones that reached it while it
    was closing were never read, and go to one of the new connections."""
    gpu = await start_backend("kandinsky", delay_s=0.005)
    balancer = await start_balancer([gpu])
    ids = await submit_and_leave(balancer, 40, require_ack=1)
    shards = []
    for _ in range(6):  # connections keep opening while the results come in
        shards.append(await balancer.connect("telegram"))
        await asyncio.sleep(0.02)
    await all_final(balancer, ids)
    finals = [m for shard in await asyncio.gather(*[collect_finals(s, 0.5) for s in shards]) for m in shard]
    assert collections.Counter(m["object_id"] for m in finals) == collections.Counter(ids)


async def test_an_unacknowledged_final_is_sent_again_until_acked(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    balancer = await start_balancer([gpu])
    first, second = await balancer.connect("telegram"), await balancer.connect("telegram")
    message = request_message("kandinsky", "text2img", {"prompt": "a fox"})
    message["settings"]["require_ack"] = True
    queued = await first.submit(message)
    await first.final(queued["object_id"])
    # Not acknowledged: when that connection goes, the final goes to the other one.
    await first.close()
    again = await second.final(queued["object_id"])
    assert again["gen_status"] == "ok" and again["settings"]["require_ack"] is True

    await second.send({"message_type": "info", "action": "ack", "object_id": queued["object_id"]})
    answer = await second.next_message(lambda m: m.get("info_type") == "ack")
    assert (answer["outcome"], answer["object_id"]) == ("acked", queued["object_id"])
    await second.close()
    later = await balancer.connect("telegram")
    assert await collect_finals(later, 0.5) == []


async def test_an_unacknowledged_final_survives_a_restart(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    message = request_message("kandinsky", "text2img", {"prompt": "a fox"})
    message["settings"]["require_ack"] = 1
    queued = await bot.submit(message)
    await bot.final(queued["object_id"])  # received, never acknowledged
    await bot.close()
    await balancer.client.close()  # the server stops

    restarted = await start_balancer([gpu])  # same database
    bot = await restarted.connect("telegram")
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    await bot.send({"message_type": "info", "action": "ack", "object_id": queued["object_id"]})
    await bot.next_message(lambda m: m.get("info_type") == "ack")
    assert await restarted.app[keys.STORE].reads.owed_finals("telegram") == []


async def test_acking_another_services_request_is_not_found(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    owner, other = await balancer.connect("telegram"), await balancer.connect("discord")
    message = request_message("kandinsky", "text2img", {"prompt": "a fox"})
    message["settings"]["require_ack"] = 1
    queued = await owner.submit(message)
    await owner.final(queued["object_id"])
    await other.send({"message_type": "info", "action": "ack", "object_id": queued["object_id"]})
    answer = await other.next_message(lambda m: m.get("info_type") == "ack")
    assert answer["outcome"] == "not_found"
    assert [j.object_id for j in await balancer.app[keys.STORE].reads.owed_finals("telegram")] == [queued["object_id"]]


async def test_a_repeated_request_id_returns_the_original_request(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    message = request_message("kandinsky", "text2img", {"prompt": "a fox"}, request_id="order-17")

    first = await bot.submit(message)
    object_id = first["object_id"]
    await bot.next_message(lambda m: m.get("gen_status") == "generating")
    await bot.send(message)  # a resend after a lost acknowledgement, say
    repeat = await bot.next_message(lambda m: m.get("object_id") == object_id)
    gpu.state.gate.set()
    final = await bot.final(object_id)
    await wait_until(lambda: _delivered(balancer, object_id))
    await bot.send(message)
    after_final = await bot.next_message(lambda m: m.get("object_id") == object_id)

    assert repeat["object_id"] == first["object_id"] and repeat["gen_status"] == "generating"
    assert final["gen_status"] == "ok"
    assert after_final["object_id"] == first["object_id"] and after_final["gen_status"] == "ok"
    assert len(gpu.state.received) == 1  # generated once
    # Another service may use the same key for its own request.
    other = await (await balancer.connect("discord")).submit(message)
    assert other["gen_status"] == "queued" and other["object_id"] != first["object_id"]
