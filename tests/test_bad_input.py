"""Every malformed message gets a clear answer, nothing reaches a backend, and the
connection keeps working for the next request."""

from __future__ import annotations

import json

import pytest

from bench.bots import request_message


@pytest.fixture
async def setup(start_backend, start_balancer):
    a1111 = await start_backend("automatic1111")
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([a1111, kandinsky], MAX_MESSAGE_BYTES=200_000)
    bot = await balancer.connect("telegram")
    return bot, [a1111, kandinsky]


async def assert_still_works(bot) -> None:
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "still here"}))
    assert queued["gen_status"] == "queued"
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"


def info_error(message: dict) -> bool:
    return message.get("message_type") == "info" and message.get("info_type") == "error"


async def test_unparseable_json_gets_an_info_message(setup):
    bot, backends = setup
    await bot.send('{"message_type": "request", "executor": ')
    answer = await bot.next_message()
    assert info_error(answer)
    assert answer["content"].startswith("Message is not valid JSON")
    await assert_still_works(bot)


@pytest.mark.parametrize("message", ["[1, 2]", '"hello"', "42", "null"])
async def test_json_that_is_not_an_object_gets_an_info_message(setup, message):
    bot, _ = setup
    await bot.send(message)
    answer = await bot.next_message()
    assert info_error(answer) and answer["content"] == "Message must be a JSON object."
    await assert_still_works(bot)


async def test_unknown_executor_gets_an_info_message_naming_the_choices(setup):
    bot, _ = setup
    await bot.send(request_message("dalle", "text2img", {"prompt": "x"}))
    answer = await bot.next_message()
    assert info_error(answer)
    assert "executor: Must be one of: kandinsky, automatic1111" in answer["content"]
    assert "executor" in answer["errors"]
    await assert_still_works(bot)


async def test_binary_frame_gets_an_info_message(setup):
    bot, _ = setup
    await bot.ws.send_bytes(b"\x00\x01")
    answer = await bot.next_message()
    assert info_error(answer) and "JSON text" in answer["content"]
    await assert_still_works(bot)


async def test_missing_service_info_is_an_error_response_tied_to_the_request(setup):
    bot, backends = setup
    message = request_message("automatic1111", "text2img", {"prompt": "x"})
    del message["service_info"]
    answer = await bot.submit(message)
    assert answer["message_type"] == "response" and answer["gen_status"] == "error"
    assert answer["executor"] == "automatic1111" and answer["gen_type"] == "text2img"
    assert answer["result"] == {
        "content_type": "text",
        "content": "Invalid request: service_info: Missing data for required field",
    }
    assert all(not b.state.received for b in backends)
    await assert_still_works(bot)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("user_id", "123", "service_info.user_id: Not a valid integer"),
        ("user_id", 1.5, "service_info.user_id: Not a valid integer"),
        ("chat_id", [], "service_info.chat_id: Not a valid integer"),
    ],
)
async def test_wrong_types_in_service_info_are_named(setup, field, value, reason):
    bot, _ = setup
    message = request_message("kandinsky", "text2img", {"prompt": "x"})
    message["service_info"][field] = value
    answer = await bot.submit(message)
    assert answer["gen_status"] == "error"
    assert reason in answer["result"]["content"]
    await assert_still_works(bot)


@pytest.mark.parametrize(
    ("executor", "gen_type", "payload", "reason"),
    [
        ("kandinsky", "text2img", {"steps": 10}, "payload.prompt: text2img needs a prompt"),
        ("kandinsky", "text2img", {"prompt": "x", "steps": "ten"}, "payload.steps: Not a valid integer"),
        ("automatic1111", "text2img", {"prompt": "x", "width": 512.5}, "payload.width: Not a valid integer"),
        ("automatic1111", "text2img", {"prompt": "x", "cfg_scale": "high"}, "payload.cfg_scale: Not a valid number"),
        ("automatic1111", "text2img", {"prompt": "x", "steps": 0}, "payload.steps: Must be greater than or equal to 1"),
        ("automatic1111", "img2img", {"prompt": "x"}, "payload.init_images: img2img needs init_images"),
        (
            "automatic1111",
            "img2img",
            {"init_images": ["not base64!"]},
            "payload.init_images: 0: Not a base64 image (raw or data:image/...;base64, URI",
        ),
        (
            "automatic1111",
            "img2img",
            {"init_images": ["AAAAAAAAAAAAAAAA"]},  # base64, but of no image
            "payload.init_images: 0: Not a base64 image",
        ),
        (
            "kandinsky",
            "mix2img",
            {"images_texts": ["a", "b"], "weights": [1, 1, 1, 1]},
            "payload.images_texts: Must hold exactly 4 items (text, image, image, text), got 2",
        ),
        (
            "kandinsky",
            "mix2img",
            {"images_texts": ["a", "aGk=", "aGk=", "b"], "weights": [1, 2]},
            "payload.weights: Length must be 4",
        ),
        ("kandinsky", "mix2img", {"weights": [1, 1, 1, 1]}, "payload.images_texts: mix2img needs images_texts"),
        (
            "automatic1111",
            "text2img",
            {"prompt": "x", "init_images": ["not base64!"]},
            "payload.init_images: 0: Not a base64 image",
        ),  # a known key of the executor is checked on every gen type
    ],
)
async def test_payloads_that_break_the_backend_contract_are_refused_with_the_field_named(
    setup, executor, gen_type, payload, reason
):
    bot, backends = setup
    answer = await bot.submit(request_message(executor, gen_type, payload))
    assert answer["gen_status"] == "error"
    assert answer["executor"] == executor and answer["gen_type"] == gen_type
    assert reason in answer["result"]["content"], answer["result"]["content"]
    assert answer["payload"] == payload  # echoed as sent
    assert all(not b.state.received for b in backends)
    await assert_still_works(bot)


@pytest.mark.parametrize(
    ("executor", "gen_type", "reason"),
    [
        ("kandinsky", "img2img", "kandinsky does not support img2img (it does mix2img, text2img)."),
        ("automatic1111", "mix2img", "automatic1111 does not support mix2img (it does img2img, text2img)."),
    ],
)
async def test_unsupported_pairs_are_refused_up_front(setup, executor, gen_type, reason):
    bot, backends = setup
    answer = await bot.submit(request_message(executor, gen_type, {"prompt": "x"}))
    assert answer["gen_status"] == "error" and answer["result"]["content"] == reason
    assert all(not b.state.received for b in backends)
    await assert_still_works(bot)


async def test_a_request_for_an_executor_with_no_backend_is_refused_at_once(start_backend, start_balancer):
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([kandinsky])
    bot = await balancer.connect("telegram")
    answer = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "x"}))
    assert answer["gen_status"] == "error"
    assert answer["result"]["content"] == "No automatic1111 backend is configured on this server."
    await assert_still_works(bot)


async def test_an_oversized_message_is_refused_readably_and_the_connection_survives(setup):
    bot, backends = setup
    big_image = "A" * 250_000  # over the 200 kB limit set for this test
    answer = await bot.submit(request_message("automatic1111", "img2img", {"init_images": [big_image]}))
    assert answer["gen_status"] == "error"
    assert "over this server's limit of 200000 bytes (MAX_MESSAGE_BYTES)" in answer["result"]["content"]
    assert all(not b.state.received for b in backends)
    await assert_still_works(bot)


async def test_settings_flags_accept_numbers_and_booleans_and_are_echoed_as_sent(setup):
    bot, _ = setup
    message = request_message("kandinsky", "text2img", {"prompt": "x"})
    message["settings"] = {"premium": True, "moderate": 0, "sync_with_s3": False, "extra": "kept"}
    queued = await bot.submit(message)
    done = await bot.final(queued["object_id"])
    assert done["settings"] == message["settings"]

    for flag in ("maybe", "1", 2, 1.0):
        message["settings"] = {"premium": flag}
        answer = await bot.submit(message)
        assert "settings.premium: Not a valid flag: use true/false or 0/1" in answer["result"]["content"]


async def test_a_message_that_is_not_a_request_gets_an_info_message(setup):
    bot, _ = setup
    await bot.send(json.dumps({"message_type": "response"}))
    answer = await bot.next_message()
    assert info_error(answer) and "message_type" in answer["errors"]
    await assert_still_works(bot)
