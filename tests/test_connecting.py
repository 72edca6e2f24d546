"""Bot services connect the way the official client does; bad keys are refused before the
upgrade; several connections of one service live side by side."""

from __future__ import annotations

import json

import aiohttp
import pytest
import websockets.client
import websockets.exceptions

from bench.bots import request_message
from tests.conftest import SERVICE_KEYS


async def test_a_client_built_like_the_official_one_gets_its_image(start_backend, start_balancer):
    kandinsky = await start_backend("kandinsky")
    balancer = await start_balancer([kandinsky])
    url = f"ws://127.0.0.1:{balancer.config.api_port}/ws/discord"

    # devoid_client 0.1.3: websockets.client.connect with both headers, JSON text frames.
    async with websockets.client.connect(
        url, extra_headers={"authorization": SERVICE_KEYS["discord"], "service": "discord"}
    ) as ws:
        await ws.send(json.dumps(request_message("kandinsky", "text2img", {"prompt": "a kite"})))
        statuses = []
        while not statuses or statuses[-1] not in ("ok", "error"):
            message = json.loads(await ws.recv())
            assert message["message_type"] == "response"
            statuses.append(message["gen_status"])

    assert statuses == ["queued", "generating", "ok"]
    assert message["service"] == "discord"
    assert message["result"]["content_type"] == "image_url"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/ws/discord", {"authorization": "wrong", "service": "discord"}),
        ("/ws/discord", {"service": "discord"}),
        ("/ws/nosuch", {"authorization": SERVICE_KEYS["discord"], "service": "nosuch"}),
        ("/ws/telegram", {"authorization": SERVICE_KEYS["discord"], "service": "discord"}),
        ("/ws", {"authorization": SERVICE_KEYS["discord"]}),
    ],
)
async def test_wrong_key_or_unknown_service_is_refused_with_401_before_the_upgrade(
    start_backend, start_balancer, path, headers
):
    balancer = await start_balancer([await start_backend("kandinsky")])
    url = f"ws://127.0.0.1:{balancer.config.api_port}{path}"
    with pytest.raises(websockets.exceptions.InvalidStatusCode) as refused:
        async with websockets.client.connect(url, extra_headers=headers):
            pass
    assert refused.value.status_code == 401


async def test_the_bare_ws_route_works_with_the_service_header(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await balancer.connect("test", path="/ws")
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "x"}))
    assert (await bot.final(queued["object_id"]))["service"] == "test"


async def test_several_connections_of_one_service_each_get_their_own_answers(start_backend, start_balancer):
    kandinsky = await start_backend("kandinsky", delay_s=0.05)
    balancer = await start_balancer([kandinsky])
    shard_a = await balancer.connect("telegram")
    shard_b = await balancer.connect("telegram")

    queued_a = await shard_a.submit(request_message("kandinsky", "text2img", {"prompt": "from a"}))
    queued_b = await shard_b.submit(request_message("kandinsky", "text2img", {"prompt": "from b"}))
    done_a = await shard_a.final(queued_a["object_id"])
    done_b = await shard_b.final(queued_b["object_id"])

    assert done_a["payload"]["prompt"] == "from a" and done_b["payload"]["prompt"] == "from b"
    # Neither shard saw the other's request: the first connection was not evicted or bypassed.
    assert {m["object_id"] for m in shard_a.received} == {queued_a["object_id"]}
    assert {m["object_id"] for m in shard_b.received} == {queued_b["object_id"]}


async def test_a_refused_http_client_reads_a_plain_reason(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await balancer.client.ws_connect("/ws/telegram", headers={"authorization": "nope"})
    assert refused.value.status == 401
