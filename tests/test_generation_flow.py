"""A bot sends each kind of request and gets queued -> generating -> ok with a real image,
and the backend receives exactly the payload the bot sent."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from yarl import URL

from app.storage.results import ResultWriter, image_url_secret
from bench.bots import request_message
from bench.images import png_base64
from tests.conftest import KANDINSKY_TOKEN

PAIRS = {
    ("automatic1111", "text2img"): (
        "/sdapi/v1/txt2img",
        {
            "prompt": "a lighthouse at dusk",
            "negative_prompt": "blurry",
            "steps": 20,
            "width": 512,
            "height": 640,
            "cfg_scale": 7.5,
            "sampler_name": "Euler a",
            "seed": 42,
            "enable_hr": False,
            "override_settings": {"CLIP_stop_at_last_layers": 2},
        },
    ),
    ("automatic1111", "img2img"): (
        "/sdapi/v1/img2img",
        {
            "prompt": "the same lighthouse in winter",
            "init_images": [png_base64()],
            "denoising_strength": 0.55,
            "steps": 12,
            "resize_mode": 1,
        },
    ),
    ("kandinsky", "text2img"): (
        "/text2img",
        {
            "prompt": "a red fox in snow",
            "steps": 30,
            "guidance_scale": 4,
            "prior_steps": "5",
            "width": 768,
            "height": 512,
            "negative_decoder_prompt": "text",
        },
    ),
    ("kandinsky", "mix2img"): (
        "/mix2images",
        {
            "images_texts": ["a cat", png_base64((0, 0, 255)), "data:image/png;base64," + png_base64(), "a dog"],
            "weights": [0.3, 0.2, 0.2, 0.3],
            "steps": 25,
        },
    ),
}


def assert_jpeg(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.width > 0 and image.height > 0


@pytest.mark.parametrize(("executor", "gen_type"), list(PAIRS))
async def test_each_pair_goes_queued_generating_ok_with_the_payload_unchanged(
    start_backend, start_balancer, executor, gen_type
):
    route, payload = PAIRS[(executor, gen_type)]
    a1111 = await start_backend("automatic1111")
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([a1111, kandinsky])
    bot = await balancer.connect("telegram")

    queued = await bot.submit(request_message(executor, gen_type, payload, trace="keep-me"))
    assert queued["gen_status"] == "queued", queued
    assert len(queued["object_id"]) == 24 and int(queued["object_id"], 16) >= 0
    assert queued["avg_time"] > 0
    done = await bot.final(queued["object_id"])

    assert bot.statuses(queued["object_id"]) == ["queued", "generating", "ok"]
    assert done["executor"] == executor and done["gen_type"] == gen_type
    assert done["service"] == "telegram" and done["avg_time"] == 0.0
    assert done["service_info"] == {"user_id": 1, "chat_id": 10, "message_id": 20, "trace": "keep-me"}
    assert done["payload"] == payload
    assert done["result"]["file_name"] == f"{queued['object_id']}.jpg"

    backend = a1111 if executor == "automatic1111" else kandinsky
    [call] = backend.state.received
    assert call.path == route
    assert call.body == payload  # same fields, same values
    if executor == "kandinsky":
        assert call.headers["authorization"] == KANDINSKY_TOKEN

    # The image is served by this server at the URL in the result, and only with its key.
    url = URL(done["result"]["content"])
    assert done["result"]["content_type"] == "image_url"
    assert url.port == balancer.config.api_port and url.path == f"/img/{queued['object_id']}.jpg"
    assert len(url.query["key"]) == 32
    response = await balancer.client.get(url.path_qs)
    assert response.status == 200 and response.content_type == "image/jpeg"
    assert_jpeg(await response.read())
    for guess in (url.path, f"{url.path}?key={'0' * 32}", f"{url.path}?key="):
        assert (await balancer.client.get(guess)).status == 404, guess


async def test_without_local_images_the_result_is_base64_jpeg(start_backend, start_balancer):
    a1111 = await start_backend("automatic1111")
    balancer = await start_balancer([a1111], SAVE_IMAGES_LOCALLY=0)
    bot = await balancer.connect("discord")

    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "a boat"}))
    done = await bot.final(queued["object_id"])

    assert done["gen_status"] == "ok"
    assert done["result"]["content_type"] == "base64"
    assert_jpeg(base64.b64decode(done["result"]["content"]))
    assert not (balancer.config.images_path / f"{queued['object_id']}.jpg").exists()


async def test_image_route_serves_only_result_files(start_backend, start_balancer, tmp_path):
    a1111 = await start_backend("automatic1111")
    balancer = await start_balancer([a1111])
    (tmp_path / "secret.jpg").write_bytes(b"not for you")
    for name in ("..%2Fsecret.jpg", "%2E%2E%2Fsecret.jpg", "secret.jpg", "0" * 24 + ".jpg"):
        response = await balancer.client.get(f"/img/{name}")
        assert response.status == 404, name


async def test_a_backend_error_ends_the_request_with_its_reason(start_backend, start_balancer):
    a1111 = await start_backend("automatic1111")
    a1111.state.fail_status = 404
    a1111.state.fail_body = {"error": "HTTPException", "detail": "Sampler not found"}
    balancer = await start_balancer([a1111])
    bot = await balancer.connect("telegram")

    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "x", "sampler_name": "Nope"}))
    done = await bot.final(queued["object_id"])

    assert done["gen_status"] == "error"
    assert done["result"]["content_type"] == "text"
    assert "Sampler not found" in done["result"]["content"]
    assert "HTTP 404" in done["result"]["content"]


async def test_with_every_backend_down_a_request_waits_queued_then_ends_with_a_clear_error(
    start_balancer, unused_tcp_port_factory
):
    dead = {
        "name": "gpu-gone",
        "gpu": "3060",
        "timeout": 5,
        "model": "sd15",
        "exec_type": "automatic1111",
        "endpoint": f"http://127.0.0.1:{unused_tcp_port_factory()}",
    }
    balancer = await start_balancer([dead], MAX_QUEUE_WAIT_S=0.5, PROBE_BACKOFF_MAX_S=0.1)
    bot = await balancer.connect("telegram")

    queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "x"}))
    notice = await bot.next_message(lambda m: m.get("info_type") == "no_backend")
    done = await bot.final(queued["object_id"])

    assert queued["gen_status"] == "queued" and queued["avg_time"] is None
    assert notice["object_id"] == queued["object_id"]
    assert "No automatic1111 backend is in service right now (gpu-gone: " in notice["content"]
    assert bot.statuses(queued["object_id"]) == ["queued", "error"]
    assert done["result"]["content"].startswith(
        "No automatic1111 backend took this request within 0.5 s (gpu-gone: unhealthy (health probe failed"
    )
    assert done["result"]["content"].endswith("It was not generated.")


@pytest.mark.parametrize(
    ("executor", "answer", "reason"),
    [
        ("kandinsky", {"not": "an image"}, "returned an image that is not a readable image"),
        ("automatic1111", {"images": [], "parameters": {}}, "answered without an image"),
        ("automatic1111", {"images": ["this is not base64!"]}, "answered with an image that is not base64"),
    ],
)
async def test_a_lone_backend_answering_something_that_is_not_an_image_fails_after_every_attempt(
    start_backend, start_balancer, executor, answer, reason
):
    gpu = await start_backend(executor)
    gpu.state.fail_status = 200
    gpu.state.fail_body = answer
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")

    queued = await bot.submit(request_message(executor, "text2img", {"prompt": "x"}))
    done = await bot.final(queued["object_id"])

    assert done["gen_status"] == "error"
    assert done["result"]["content"].startswith(f"Failed after 3 attempts; the last: backend {executor}-")
    assert reason in done["result"]["content"]
    assert len(gpu.state.received) == 3


def test_image_keys_survive_a_restart_and_symlinked_images_are_not_served(tmp_path):
    database = tmp_path / "devoid.sqlite3"
    secret = image_url_secret("", database)
    assert image_url_secret("", database) == secret  # kept: URLs already sent stay valid
    assert (database.with_name("devoid.sqlite3.image-url-secret").stat().st_mode & 0o777) == 0o600
    assert image_url_secret("configured", database) == b"configured"

    writer = ResultWriter(
        save_locally=True, images_path=tmp_path / "images", url_prefix="http://x/img/", url_secret=secret
    )
    (tmp_path / "elsewhere.jpg").write_bytes(b"not an image of ours")
    name = "0" * 24 + ".jpg"
    (tmp_path / "images" / name).symlink_to(tmp_path / "elsewhere.jpg")
    assert writer.served_file(name, writer.image_key(name)) is None


async def test_numbers_past_64_bits_reach_the_backend_exactly_as_sent(start_backend, start_balancer):
    # The fast JSON parser reads such integers as floats; the server must notice and keep them
    # exact, in the row it stores and in the call it makes.
    payload = {"prompt": "a lighthouse", "seed": 2**70 + 1, "steps": 20, "cfg_scale": 7.25}
    a1111 = await start_backend("automatic1111")
    balancer = await start_balancer([a1111])
    bot = await balancer.connect("telegram")

    queued = await bot.submit(request_message("automatic1111", "text2img", payload))
    done = await bot.final(queued["object_id"])

    assert done["gen_status"] == "ok", done
    [call] = a1111.state.received
    assert call.body == payload and call.body["seed"] == 1180591620717411303425
    assert done["payload"]["seed"] == 2**70 + 1
