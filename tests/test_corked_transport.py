"""Frames a connection sends close together leave in one socket write (app/web/corked_transport.py),
and the client still gets each of them whole, in the order sent, before the close that follows;
a connection that is gone drops what waited, without an error."""

from __future__ import annotations

import asyncio
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


async def corked_websocket(request: web.Request) -> tuple[web.WebSocketResponse, CorkedTransport]:
    """A websocket answering `request`, its frames written through a CorkedTransport."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    assert request.transport is not None
    return ws, CorkedTransport.install(ws, request.transport)


def numbered(number: int, size: int = 0) -> str:
    return json.dumps({"n": number, "pad": "x" * size})


async def test_a_burst_of_frames_then_a_close_arrives_whole_in_order_and_the_close_last():
    # Small frames, a frame above FLUSH_AT_BYTES among them (written at once, after those
    # waiting), a frame of 70,000 bytes (a 64-bit length), then the server closes at once.
    sizes = [0] * 50 + [FLUSH_AT_BYTES * 2] + [10] * 20 + [70_000] + [0] * 5

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws, _ = await corked_websocket(request)
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
        ws, corked = await corked_websocket(request)
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
        ws, _ = await corked_websocket(request)
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


async def test_sends_in_an_at_once_block_let_no_other_task_run_and_arrive_in_order():
    # Intake puts a burst's requests in line before sending their `queued`, relying on this:
    # inside the block no send waits, not even after a frame of 16 MB, more than the sockets
    # between take at once (written straight to the socket, it would make the next send wait).
    sizes = [0] * 30 + [FLUSH_AT_BYTES * 2, 16 * 1024 * 1024] + [10] * 30
    outcome: dict[str, object] = {}

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws, corked = await corked_websocket(request)
        other_task_ran: list[bool] = []
        asyncio.get_running_loop().call_soon(other_task_ran.append, True)
        with corked.sends_at_once() as at_once:
            outcome["at_once"] = at_once
            for number, size in enumerate(sizes):
                await ws.send_str(numbered(number, size))
            outcome["other task ran"] = bool(other_task_ran)
        await ws.close()
        return ws

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as client:
            received = [json.loads(message.data) async for message in client]
    finally:
        await runner.cleanup()
    assert outcome == {"at_once": True, "other task ran": False}
    assert [message["n"] for message in received] == list(range(len(sizes)))


async def test_a_connection_whose_client_stopped_reading_cannot_send_at_once():
    outcome: dict[str, object] = {}
    reading = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws, corked = await corked_websocket(request)
        sending = asyncio.create_task(flood(ws))
        # Until the sockets between are full and the sender waits for the client.
        while not sending.done() and corked.get_write_buffer_size() < 256 * 1024:
            await asyncio.sleep(0.01)
        with corked.sends_at_once() as at_once:
            outcome["at_once"] = at_once
        reading.set()
        await sending
        await ws.close()
        return ws

    async def flood(ws: web.WebSocketResponse) -> None:
        for number in range(400):
            await ws.send_str(numbered(number, 100_000))

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as client:
            await reading.wait()
            received = [json.loads(message.data)["n"] async for message in client]
    finally:
        await runner.cleanup()
    assert outcome == {"at_once": False}
    assert received == list(range(400))
