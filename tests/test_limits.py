"""One bot, or one of its users, cannot take the server for itself: each limit refuses with
its stable code, over the websocket and over HTTP, and everyone else carries on."""

from __future__ import annotations

import pytest

from bench.bots import request_message
from tests.conftest import SERVICE_KEYS

TELEGRAM = {"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}


def a_request(prompt: str = "a lighthouse", *, user_id: int = 1, premium: int = 0, **payload) -> dict:
    return request_message("automatic1111", "text2img", {"prompt": prompt, **payload}, user_id=user_id, premium=premium)


@pytest.fixture
async def held_gpu(start_backend):
    """A GPU that takes requests but finishes none until its gate is set."""
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    return gpu


async def test_a_user_with_the_cap_queued_is_refused_until_one_finishes(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_USER_REQUESTS=3)
    bot = await balancer.connect("telegram")
    accepted = [await bot.submit(a_request(f"mine {n}", user_id=7)) for n in range(3)]
    assert [answer["gen_status"] for answer in accepted] == ["queued"] * 3

    refused = await bot.submit(a_request("one too many", user_id=7))
    assert refused["gen_status"] == "error" and refused["code"] == "user_queue_full"
    assert "User 7 already has 3 requests queued or running" in refused["result"]["content"]
    assert refused["service_info"]["user_id"] == 7  # the bot can tell which of its users to answer
    # Another user of the same bot is not held up by user 7.
    assert (await bot.submit(a_request("someone else", user_id=8)))["gen_status"] == "queued"

    held_gpu.state.gate.set()
    await bot.final(accepted[0]["object_id"])
    assert (await bot.submit(a_request("my turn again", user_id=7)))["gen_status"] == "queued"
    assert "one too many" not in [call.body["prompt"] for call in held_gpu.state.received]


async def test_a_request_may_ask_for_a_lower_cap_for_its_user_but_not_a_higher_one(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_USER_REQUESTS=3)
    bot = await balancer.connect("telegram")

    def asking(cap: int) -> dict:
        return request_message("automatic1111", "text2img", {"prompt": "a fox"}, user_id=5, max_user_queue_size=cap)

    assert (await bot.submit(asking(1)))["gen_status"] == "queued"
    lowered = await bot.submit(asking(1))
    assert lowered["code"] == "user_queue_full" and "(cap 1)" in lowered["result"]["content"]
    for _ in range(2):
        assert (await bot.submit(asking(50)))["gen_status"] == "queued"
    assert (await bot.submit(asking(50)))["code"] == "user_queue_full"  # the server's 3 still holds


async def test_the_user_cap_is_refused_over_http_with_429(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_USER_REQUESTS=1)
    first = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=a_request(user_id=3))
    assert first.status == 202
    second = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=a_request(user_id=3))
    error = (await second.json())["error"]
    assert second.status == 429 and error["code"] == "user_queue_full" and "User 3" in error["message"]


async def test_a_service_with_its_cap_queued_is_refused_while_other_services_are_not(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_SERVICE_REQUESTS="telegram:4 100", MAX_USER_REQUESTS=0)
    telegram, discord = await balancer.connect("telegram"), await balancer.connect("discord")
    for n in range(4):
        assert (await telegram.submit(a_request(user_id=n)))["gen_status"] == "queued"
    refused = await telegram.submit(a_request(user_id=99))
    assert refused["code"] == "service_queue_full" and "'telegram' already has 4" in refused["result"]["content"]
    for n in range(6):
        assert (await discord.submit(a_request(user_id=n)))["gen_status"] == "queued"
    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=a_request(user_id=100))
    assert response.status == 429 and (await response.json())["error"]["code"] == "service_queue_full"


async def test_a_service_sending_faster_than_its_rate_is_told_when_to_send_again(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], SERVICE_RATE_PER_S="0.5", SERVICE_BURST=3, MAX_USER_REQUESTS=0)
    bot = await balancer.connect("telegram")
    for _ in range(3):  # the burst
        assert (await bot.submit(a_request()))["gen_status"] == "queued"
    refused = await bot.submit(a_request())
    assert refused["code"] == "rate_limited" and 0 < refused["retry_after_s"] <= 2.0
    # The other service has a bucket of its own.
    assert (await (await balancer.connect("discord")).submit(a_request()))["gen_status"] == "queued"

    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=a_request())
    error = (await response.json())["error"]
    assert response.status == 429 and error["code"] == "rate_limited"
    assert response.headers["Retry-After"] in ("1", "2") and error["retry_after_s"] > 0


async def test_premium_is_refused_to_services_not_allowed_to_send_it(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], PREMIUM_SERVICES="discord")
    telegram, discord = await balancer.connect("telegram"), await balancer.connect("discord")
    refused = await telegram.submit(a_request(premium=1))
    assert refused["code"] == "premium_not_allowed" and "PREMIUM_SERVICES" in refused["result"]["content"]
    assert (await telegram.submit(a_request(premium=0)))["gen_status"] == "queued"
    assert (await discord.submit(a_request(premium=1)))["gen_status"] == "queued"
    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=a_request(premium=1))
    assert response.status == 403 and (await response.json())["error"]["code"] == "premium_not_allowed"


async def test_a_job_over_the_size_ceiling_is_refused_before_it_reaches_a_gpu(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], MAX_JOB_UNITS=512 * 512 * 50)
    bot = await balancer.connect("telegram")
    huge = a_request("a huge mural", width=1024, height=1024, steps=50)
    refused = await bot.submit(huge)
    assert refused["code"] == "job_too_large" and "MAX_JOB_UNITS" in refused["result"]["content"]
    assert refused["payload"] == huge["payload"]
    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, json=huge)
    assert response.status == 413 and (await response.json())["error"]["code"] == "job_too_large"
    small = await bot.submit(a_request("a stamp", width=512, height=512, steps=50))
    assert (await bot.final(small["object_id"]))["gen_status"] == "ok"
    assert [call.body["prompt"] for call in gpu.state.received] == ["a stamp"]


async def test_what_a_user_had_queued_still_counts_after_a_restart(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_USER_REQUESTS=2)
    bot = await balancer.connect("telegram")
    for _ in range(2):
        assert (await bot.submit(a_request(user_id=11)))["gen_status"] == "queued"
    await bot.close()
    await balancer.client.close()

    restarted = await start_balancer([held_gpu], MAX_USER_REQUESTS=2)
    bot = await restarted.connect("telegram")
    assert (await bot.submit(a_request(user_id=11)))["code"] == "user_queue_full"


async def test_refusals_are_counted_in_metrics(held_gpu, start_balancer):
    balancer = await start_balancer([held_gpu], MAX_USER_REQUESTS=1)
    bot = await balancer.connect("telegram")
    await bot.submit(a_request(user_id=1))
    for _ in range(2):
        assert (await bot.submit(a_request(user_id=1)))["code"] == "user_queue_full"
    text = await (await balancer.client.get("/metrics")).text()
    assert 'devoid_refused_requests_total{code="user_queue_full",service="telegram"} 2.0' in text


async def test_a_limit_naming_a_service_that_does_not_exist_stops_start_up(start_balancer):
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="MAX_USER_REQUESTS: no service is named 'telgram'"):
        await start_balancer([], MAX_USER_REQUESTS="telgram:5")
