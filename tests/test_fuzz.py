"""A seeded fuzzer over the websocket: every frame, valid, mutated, deeply nested, truncated or
garbage, gets exactly one answer, nothing crashes, and the server serves normally afterwards.
(schemathesis does the same for the HTTP API in test_openapi.py; bench/fuzz.py is the long run.)"""

from __future__ import annotations

import logging

from app import keys
from bench.bots import request_message
from bench.fuzz_frames import answer_to_frame, fuzz_frames

FUZZ_SEED = 20261130


async def test_every_fuzzed_frame_gets_one_answer_and_nothing_breaks(start_backend, start_balancer, caplog):
    caplog.set_level(logging.WARNING)
    balancer = await start_balancer(
        [await start_backend("automatic1111"), await start_backend("kandinsky")], MAX_QUEUE_WAIT_S=60
    )
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
        request_message("kandinsky", "text2img", {"prompt": "after the fuzz"})
    )
    assert fresh["gen_status"] == "queued"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert balancer.app[keys.SCHEDULER].running
