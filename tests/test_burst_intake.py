"""A bot that sends many requests without waiting for answers: the requests read in one pass of
the event loop are accepted together (Intake.accept_together), and each still gets exactly what
it would have got alone, in the order it was sent."""

from __future__ import annotations

import asyncio
import json
import logging

from app import keys
from app.domain.jobs import JobStatus
from app.web.gateway import BurstTurn
from bench.bots import Bot, request_message, wait_until

NO_SERVICE_LIMITS = {"SERVICE_RATE_PER_S": "0", "MAX_SERVICE_REQUESTS": "0"}


async def first_answers(bot: Bot, count: int) -> list[dict]:
    """The first answer (`queued` or an error response) of each of `count` requests, as they come."""
    return [
        await bot.next_message(lambda m: m.get("message_type") == "response" and m.get("gen_status") != "generating")
        for _ in range(count)
    ]


async def test_a_burst_of_300_is_queued_in_the_order_sent_stored_and_run(start_backend, start_balancer, caplog):
    caplog.set_level(logging.INFO, logger="app.web.intake")
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n in range(300):
        await bot.send(request_message("automatic1111", "text2img", {"prompt": f"burst {n}"}, user_id=n))

    answers = await first_answers(bot, 300)
    assert [answer["gen_status"] for answer in answers] == ["queued"] * 300
    assert [answer["service_info"]["user_id"] for answer in answers] == list(range(300))
    store = balancer.app[keys.STORE]
    for answer in answers:
        assert (await store.reads.get(answer["object_id"])).status in (JobStatus.QUEUED, JobStatus.GENERATING)

    # The log names every request, in fewer lines: one per burst accepted together.
    queued_lines = [r.getMessage() for r in caplog.records if r.name == "app.web.intake" and "queued" in r.getMessage()]
    assert len(queued_lines) < 300
    logged = " ".join(queued_lines)
    assert all(answer["object_id"] in logged for answer in answers)

    gpu.state.gate.set()
    await wait_until(lambda: len(gpu.state.received) == 300, timeout_s=60)
    assert [call.body["prompt"] for call in gpu.state.received] == [f"burst {n}" for n in range(300)]


async def test_bots_sending_one_request_at_a_time_each_find_their_requests_named_once_in_the_log(
    start_backend, start_balancer, caplog
):
    # The accepts one group commit wakes share their `queued` lines, one per service however
    # many connections the requests came on: each request must still be named exactly once,
    # beside its own service.
    caplog.set_level(logging.INFO, logger="app.web.intake")
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], **NO_SERVICE_LIMITS)
    services = ["telegram"] * 12 + ["discord"] * 4
    bots = [await balancer.connect(service) for service in services]

    async def send_one_at_a_time(bot: Bot, number: int) -> list[str]:
        answers = [
            await bot.submit(request_message("automatic1111", "text2img", {"prompt": "p"}, user_id=number * 10 + n))
            for n in range(5)
        ]
        assert [answer["gen_status"] for answer in answers] == ["queued"] * 5
        return [answer["object_id"] for answer in answers]

    sent = await asyncio.gather(*(send_one_at_a_time(bot, number) for number, bot in enumerate(bots)))
    await asyncio.sleep(0)  # the lines of the last pass are written at its end

    queued_lines = [r.getMessage() for r in caplog.records if r.name == "app.web.intake" and "queued" in r.getMessage()]
    assert len(queued_lines) < 80
    for service, object_ids in zip(services, sent, strict=True):
        for object_id in object_ids:
            naming = [line for line in queued_lines if object_id in line]
            assert len(naming) == 1, (object_id, naming)
            assert f"from {service} (ws)" in naming[0]


async def test_in_a_burst_past_a_users_cap_the_first_are_queued_and_the_rest_refused_in_order(
    start_backend, start_balancer
):
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], MAX_USER_REQUESTS=3, **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n in range(6):
        await bot.send(request_message("automatic1111", "text2img", {"prompt": f"mine {n}"}, user_id=7, n=n))

    answers = await first_answers(bot, 6)
    assert [answer["service_info"]["n"] for answer in answers] == list(range(6))
    assert [answer["gen_status"] for answer in answers] == ["queued"] * 3 + ["error"] * 3
    assert {answer.get("code") for answer in answers[3:]} == {"user_queue_full"}
    stored = [await balancer.app[keys.STORE].reads.get(answer["object_id"]) for answer in answers]
    assert [job is not None for job in stored] == [True] * 3 + [False] * 3


async def test_a_request_whose_payload_is_large_only_in_utf8_is_queued_within_a_burst(start_backend, start_balancer):
    # 40,000 characters, 80,000 bytes in UTF-8: short enough as text to be taken with its burst,
    # large enough that its payload is kept in a file beside the database.
    prompt = "ж" * 40_000
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n, text in enumerate(["before", prompt, "after"]):
        message = request_message("automatic1111", "text2img", {"prompt": text}, user_id=n)
        await bot.send(json.dumps(message, ensure_ascii=False))  # as UTF-8, not \u escapes

    answers = await first_answers(bot, 3)
    assert [answer["gen_status"] for answer in answers] == ["queued"] * 3
    await wait_until(lambda: len(gpu.state.received) == 3)
    assert sorted(call.body["prompt"] for call in gpu.state.received) == sorted(["before", prompt, "after"])


async def test_a_bot_pipelining_past_what_one_connection_may_hold_pending_gets_every_request_queued(
    start_backend, start_balancer
):
    # 800 requests of 30 KB: 24 MB, past the 16 MB one connection may have between receipt
    # and `queued` (gateway.MAX_PENDING_BYTES). The server stops reading the socket until
    # earlier requests are committed: nothing is refused, and the order holds.
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    balancer = await start_balancer([gpu], **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n in range(800):
        prompt = f"long prompt {n} " + "x" * 30_000
        await bot.send(request_message("automatic1111", "text2img", {"prompt": prompt}, user_id=n))

    answers = await first_answers(bot, 800)
    assert [answer["gen_status"] for answer in answers] == ["queued"] * 800
    assert [answer["service_info"]["user_id"] for answer in answers] == list(range(800))
    store = balancer.app[keys.STORE]
    assert (await store.reads.get(answers[-1]["object_id"])).payload["prompt"].startswith("long prompt 799 ")


async def test_a_burst_run_at_once_tells_each_request_queued_before_generating(start_backend, start_balancer):
    # The burst's requests are put in line before their `queued` answers are sent, and an
    # idle backend takes the first at once: each must still hear `queued` first.
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n in range(100):
        await bot.send(request_message("automatic1111", "text2img", {"prompt": f"now {n}"}, user_id=n))

    answers = await first_answers(bot, 100)
    assert [answer["service_info"]["user_id"] for answer in answers] == list(range(100))
    for answer in answers:
        await bot.final(answer["object_id"])
        assert bot.statuses(answer["object_id"]) == ["queued", "generating", "ok"]
        assert answer["avg_time"] is not None


async def test_a_bot_that_stops_reading_mid_burst_gets_every_answer_in_order_when_it_reads_again(
    start_backend, start_balancer
):
    # Every answer echoes the request's service_info, here 30 KB: 300 requests make ~27 MB of
    # `queued`, `generating` and `ok`, more than the sockets between server and bot hold, so
    # the server's sends wait for the bot partway through, while later bursts arrive and four
    # idle backends take requests as soon as they are in line. Nothing may be lost or
    # reordered: neither a later burst's `queued` before an earlier one's, nor a request's
    # `generating` before its `queued`.
    gpus = [await start_backend("automatic1111") for _ in range(4)]
    balancer = await start_balancer(gpus, **NO_SERVICE_LIMITS)
    bot = await balancer.connect("telegram")
    for n in range(300):
        await bot.send(request_message("automatic1111", "text2img", {"prompt": f"p{n}"}, user_id=n, note="x" * 30_000))
        if n % 10 == 9:
            await asyncio.sleep(0.02)  # bursts of ten
    await asyncio.sleep(1.0)  # not reading meanwhile

    answers = [await bot.next_message(lambda m: m.get("gen_status") in ("queued", "error")) for _ in range(300)]
    assert [answer["gen_status"] for answer in answers] == ["queued"] * 300
    assert [answer["service_info"]["user_id"] for answer in answers] == list(range(300))
    for answer in answers:
        final = await bot.final(answer["object_id"])
        assert final["gen_status"] == "ok"
        assert bot.statuses(answer["object_id"]) == ["queued", "generating", "ok"]


async def test_a_burst_cancelled_while_waiting_for_its_turn_still_keeps_the_next_one_behind_the_first():
    # At shutdown an accept may be cancelled while the burst before it still answers: the
    # burst after it must wait for that one, not hang and not go first.
    loop = asyncio.get_running_loop()
    answered = [loop.create_future() for _ in range(3)]
    first, second, third = (
        BurstTurn(None, answered[0]),
        BurstTurn(answered[0], answered[1]),
        BurstTurn(answered[1], answered[2]),
    )
    order: list[str] = []

    async def answer(name: str, turn: BurstTurn, hold: asyncio.Event | None = None) -> None:
        async with turn:
            if hold is not None:
                await hold.wait()
            order.append(name)

    release_first = asyncio.Event()
    tasks = [
        asyncio.create_task(answer("first", first, release_first)),
        asyncio.create_task(answer("second", second)),
        asyncio.create_task(answer("third", third)),
    ]
    await asyncio.sleep(0.01)
    tasks[1].cancel()
    await asyncio.sleep(0.01)
    assert order == []  # the third still waits for the first
    release_first.set()
    await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), timeout=5)
    assert order == ["first", "third"]
    assert tasks[1].cancelled()
