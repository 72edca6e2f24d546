"""A seeded fuzzer over the websocket: every frame, valid, mutated, deeply nested, truncated or
garbage, gets exactly one answer, nothing crashes, and the server serves normally afterwards.
(schemathesis does the same for the HTTP API in test_openapi.py; bench/fuzz.py is the long run.)"""

from __future__ import annotations

import logging

from app import keys
from tests.bots import Bot, request_message
from tests.fuzz_frames import fuzz_frames

FUZZ_SEED = 20261130
INTAKE_INFOS = {"error", "cancel", "ack"}


async def answer_to_frame(bot: Bot, queued: set[str]) -> dict:
    """The one answer intake gives a frame: `queued`, a refusal, or an action's or error's info
    (finals and notices of earlier requests are passed over)."""
    def is_intake_answer(message: dict) -> bool:
        if message.get("message_type") == "info":
            return message.get("info_type") in INTAKE_INFOS
        status = message.get("gen_status")
        return status == "queued" or (status == "error" and message["object_id"] not in queued)

    answer = await bot.next_message(is_intake_answer)
    if answer.get("gen_status") == "queued":
        queued.add(answer["object_id"])
    return answer


async def test_every_fuzzed_frame_gets_one_answer_and_nothing_breaks(start_backend, start_balancer, caplog):
    caplog.set_level(logging.WARNING)
    balancer = await start_balancer([await start_backend("automatic1111"), await start_backend("kandinsky")],
                                    MAX_QUEUE_WAIT_S=60)
    bot = await balancer.connect("telegram")
    queued: set[str] = set()
    kinds: dict[str, int] = {}
    for frame in fuzz_frames(FUZZ_SEED, 600):
        await bot.send(frame)
        answer = await answer_to_frame(bot, queued)
        kind = answer.get("info_type") or answer["gen_status"]
        kinds[kind] = kinds.get(kind, 0) + 1

    assert sum(kinds.values()) == 600
    assert kinds.get("queued", 0) > 30 and kinds.get("error", 0) > 300  # both paths were exercised
    for object_id in queued:  # every accepted request ends
        await bot.final(object_id)
    assert (await balancer.client.get("/health")).status == 200
    fresh = await (await balancer.connect("discord")).submit(
        request_message("kandinsky", "text2img", {"prompt": "after the fuzz"}))
    assert fresh["gen_status"] == "queued"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert balancer.app[keys.SCHEDULER].running
