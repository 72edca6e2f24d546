"""A bot written the way the official devoid_client 0.1.3 speaks gets every kind of request it
offers served, with one final per request and its payload forwarded exactly as sent; keys a
backend does not know are forwarded and reported, not refused."""

from __future__ import annotations

import pytest

from bench.bots import request_message
from bench.images import png_base64
from tests.conftest import SERVICE_KEYS
from tests.official_client import OfficialBot, automatic1111_payload, kandinsky_payload, official_request

ROUTES = {
    ("automatic1111", "text2img"): "/sdapi/v1/txt2img",
    ("automatic1111", "img2img"): "/sdapi/v1/img2img",
    ("kandinsky", "text2img"): "/text2img",
    ("kandinsky", "mix2img"): "/mix2images",
}


def official_shapes() -> dict[tuple[str, str], dict]:
    """One payload of each kind, as the official client fills them in."""
    return {
        ("automatic1111", "text2img"): automatic1111_payload("a lighthouse at dusk"),
        ("automatic1111", "img2img"): automatic1111_payload("the lighthouse in winter", init_images=[png_base64()]),
        ("kandinsky", "text2img"): kandinsky_payload("a red fox in snow"),
        ("kandinsky", "mix2img"): kandinsky_payload(
            images_texts=["a cat", png_base64((0, 0, 255)), png_base64(), "a dog"], weights=[0.3, 0.2, 0.2, 0.3]
        ),
    }


async def start_official_bot(balancer) -> OfficialBot:
    server = balancer.client.server
    bot = OfficialBot(f"ws://{server.host}:{server.port}", "discord", SERVICE_KEYS["discord"])
    await bot.connect()
    return bot


@pytest.mark.parametrize(
    "flags",
    [
        {"premium": 0, "sync_with_s3": 0},
        {"premium": True, "sync_with_s3": False},
        {"premium": False, "sync_with_s3": True},
    ],
    ids=["ints", "premium-true", "sync-true"],
)
async def test_the_four_official_shapes_are_served_end_to_end(start_backend, start_balancer, flags):
    a1111 = await start_backend("automatic1111")
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([a1111, kandinsky])
    bot = await start_official_bot(balancer)
    shapes = official_shapes()
    sent = {}
    for user_id, ((executor, gen_type), payload) in enumerate(shapes.items(), start=1):
        sent[user_id] = official_request(executor, gen_type, payload, user_id=user_id, **flags)
        await bot.request(sent[user_id])
    await bot.wait_idle()
    await bot.close()

    assert bot.broken == []
    assert len(bot.finals) == 4  # exactly one final per request
    for final in bot.finals:
        request = sent[final["service_info"]["user_id"]]
        assert final["gen_status"] == "ok", final["result"]
        assert final["service_info"] == request["service_info"]  # echoed unchanged
        assert final["settings"] == request["settings"]
        assert final["payload"] == request["payload"]
        statuses = [r["gen_status"] for r in bot.responses if r["object_id"] == final["object_id"]]
        assert statuses == ["queued", "generating", "ok"]
    # What each backend received is what the bot sent, nulls and empty lists included.
    received = {call.path: call.body for backend in (a1111, kandinsky) for call in backend.state.received}
    for (executor, gen_type), payload in shapes.items():
        assert received[ROUTES[(executor, gen_type)]] == payload
    assert received["/sdapi/v1/txt2img"]["init_images"] is None
    assert received["/text2img"]["images_texts"] == [] and received["/mix2images"]["prompt"] == ""


async def test_one_user_sends_the_next_request_only_after_each_final(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await start_official_bot(balancer)
    for n in range(5):
        await bot.request(official_request("kandinsky", "text2img", kandinsky_payload(f"fox {n}"), user_id=7))
    await bot.wait_idle()
    await bot.close()
    assert bot.broken == []
    assert [f["gen_status"] for f in bot.finals] == ["ok"] * 5
    assert len({f["object_id"] for f in bot.finals}) == 5


async def test_an_unknown_key_is_forwarded_and_reported_with_the_nearest_name(start_backend, start_balancer):
    a1111 = await start_backend("automatic1111")
    balancer = await start_balancer([a1111])
    bot = await balancer.connect("telegram")
    payload = {
        "prompt": "a harbour",
        "stpes": 12,
        "alwayson_scripts": {"controlnet": {"args": []}},
        "my_extension_field": {"on": True},
    }

    queued = await bot.submit(request_message("automatic1111", "text2img", payload))
    assert queued["gen_status"] == "queued"
    notice = await bot.next_message(lambda m: m.get("info_type") == "unknown_field")
    final = await bot.final(queued["object_id"])

    assert notice["object_id"] == queued["object_id"]
    assert notice["unknown_fields"] == {"stpes": "steps", "my_extension_field": None}
    assert "payload.stpes is not an automatic1111 field; did you mean steps?" in notice["content"]
    assert "forwarded and the backend will ignore them" in notice["content"]
    assert final["gen_status"] == "ok"
    [call] = a1111.state.received
    assert call.body == payload  # the unknown keys reached the backend unchanged


@pytest.mark.parametrize(
    ("executor", "gen_type", "payload", "reason"),
    [
        ("automatic1111", "text2img", {"prompt": None, "steps": 20}, "payload.prompt: text2img needs a prompt"),
        ("kandinsky", "text2img", kandinsky_payload(""), "payload.prompt: Shorter than minimum length 1"),
        ("automatic1111", "img2img", automatic1111_payload("x"), "payload.init_images: img2img needs init_images"),
        ("kandinsky", "mix2img", kandinsky_payload("x"), "payload.images_texts: Must hold exactly 4 items"),
        ("automatic1111", "text2img", {"prompt": "x", "steps": "many"}, "payload.steps: Not a valid integer"),
    ],
)
async def test_a_request_that_cannot_work_is_still_refused_readably(
    start_backend, start_balancer, executor, gen_type, payload, reason
):
    balancer = await start_balancer([await start_backend("automatic1111"), await start_backend("kandinsky")])
    bot = await balancer.connect("telegram")
    answer = await bot.submit(request_message(executor, gen_type, payload))
    assert answer["gen_status"] == "error"
    assert reason in answer["result"]["content"]
