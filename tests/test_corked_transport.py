"""Frames a connection sends close together leave in one socket write (app/web/corked_transport.py),
and the client still gets each of them whole, in the order sent, before the close that follows;
a connection that is gone drops what waited, without an error."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import WSMsgType, web

from app.web.corked_transport import FLUSH_AT_BYTES, CorkedTransport


async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/ws"


def numbered(number: int, size: int = 0) -> str:
    return json.dumps({"n": number, "pad": "x" * size})


async def test_a_burst_of_frames_then_a_close_arrives_whole_in_order_and_the_close_last():
    # Small frames, a frame above FLUSH_AT_BYTES among them (written at once, after those
    # waiting), a frame of 70,000 bytes (a 64-bit length), then the server closes at once.
    sizes = [0] * 50 + [FLUSH_AT_BYTES * 2] + [10] * 20 + [70_000] + [0] * 5

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        CorkedTransport.install(ws, request.transport)
        for number, size in enumerate(sizes):
            await ws.send_str(numbered(number, size))
        await ws.close(code=4001, message=b"done")
        return ws

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as client:
            received = [json.loads(message.data) async for message in client]
            assert client.close_code == 4001
    finally:
        await runner.cleanup()
    assert [message["n"] for message in received] == list(range(len(sizes)))
    assert [len(message["pad"]) for message in received] == sizes


async def test_frames_waiting_for_a_connection_that_is_aborted_are_dropped_quietly():
    outcome: dict[str, object] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        corked = CorkedTransport.install(ws, request.transport)
        await ws.send_str(numbered(1))
        outcome["waiting"] = corked.get_write_buffer_size()
        corked.abort()  # as the hub does to a client that stopped reading
        corked.flush()  # what the loop would run next: nothing left to write, no error
        outcome["after"] = corked.get_write_buffer_size()
        return ws

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as client:
            message = await client.receive()
    finally:
        await runner.cleanup()
    assert message.type in (WSMsgType.CLOSED, WSMsgType.CLOSE, WSMsgType.ERROR)
    assert outcome["waiting"] > 0 and outcome["after"] == 0


async def test_a_client_that_closes_gets_the_servers_close_reply_not_a_dropped_connection():
    # aiohttp answers a client's close and closes the socket in the same pass of the loop: the
    # close reply (and what was sent just before it) must not still be waiting then.
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        CorkedTransport.install(ws, request.transport)
        async for message in ws:
            await ws.send_str(f"answer to {message.data}")
        return ws

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session:
            for attempt in range(5):
                client = await session.ws_connect(url)
                await client.send_str(f"request {attempt}")
                await client.close()
                assert client.close_code == 1000, attempt
    finally:
        await runner.cleanup()
