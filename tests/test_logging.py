"""Logs say what happened to each request, at DEBUG too, and never hold a key, a token or a
base64 image."""

from __future__ import annotations

import aiohttp
import pytest

from bench.bots import Bot, request_message, wait_until
from bench.images import noisy_png_base64
from bench.processes import ServerProcess
from tests.conftest import KANDINSKY_TOKEN, SERVICE_KEYS, base_env, write_executors
from tests.mirror_servers import S3_KEYS


@pytest.fixture
async def server(tmp_path, unused_tcp_port_factory, start_backend, s3_server, mongo_server):
    a1111 = await start_backend("automatic1111")
    kandinsky = await start_backend("kandinsky")
    a1111.state.fail_status = 422  # its refusal (which may quote input) is logged too
    a1111.state.fail_body = {"detail": "bad input"}
    write_executors(tmp_path, [a1111, kandinsky])
    # Every part that talks to the outside is on: S3 and MongoDB mirrors too.
    process = ServerProcess(
        base_env(tmp_path, unused_tcp_port_factory(), LOGGING_LEVEL="DEBUG", **s3_server.env(), **mongo_server.env()),
        tmp_path / "server.log",
    )
    await process.start()
    yield process
    await process.stop()


async def test_no_key_token_or_image_reaches_the_log(server):
    image = noisy_png_base64(32)
    async with aiohttp.ClientSession() as session:
        refused = await session.get(
            f"{server.base_url}/ws/telegram", headers={"authorization": "a-wrong-secret", "service": "telegram"}
        )
        assert refused.status == 401
        ws = await session.ws_connect(
            f"{server.base_url}/ws/telegram", headers={"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}
        )
        bot = Bot(ws)
        for message in (
            request_message("automatic1111", "img2img", {"prompt": "p", "init_images": [image]}),
            request_message("automatic1111", "img2img", {"prompt": "p", "init_images": [image + "!"]}),
            request_message(
                "kandinsky", "mix2img", {"images_texts": ["a", image, image, "b"], "weights": [1, 1, 1, 1]}
            ),
        ):
            answer = await bot.submit(message)
            if answer["gen_status"] == "queued":
                await bot.final(answer["object_id"])
        await ws.close()

    await wait_until(lambda: "uploaded to S3" in server.log())
    log = server.log()
    assert "queued: automatic1111 img2img from telegram" in log  # it does log the story
    for secret in [*SERVICE_KEYS.values(), KANDINSKY_TOKEN, "a-wrong-secret", *S3_KEYS.values()]:
        assert secret not in log
    assert image[:40] not in log and image[-40:] not in log
