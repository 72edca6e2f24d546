"""Input built to hurt cannot stop, freeze or poison the server: deep nesting is refused at
intake and an unreadable stored row never stops a restart; NaN is refused; limits count bytes
on both transports; a text frame that is not UTF-8 is answered; a key that is not UTF-8 is a
401; a frame of many unknown keys gets a bounded answer while /health keeps answering."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

from aiohttp import WSMsgType

from app import keys
from bench.bots import request_message, wait_until
from bench.images import broken_png_base64
from tests.conftest import SERVICE_KEYS

TELEGRAM = {"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_deep_nesting_is_refused_at_intake_on_both_transports(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await balancer.connect("telegram")
    for depth in (33, 975, 100_000):
        text = json.dumps(request_message("kandinsky", "text2img", {"prompt": "x"})).replace(
            '"chat_id": 10', f'"chat_id": 10, "deep": {nested(depth)}'
        )
        await bot.send(text)
        answer = await bot.next_message()
        assert answer["info_type"] == "error"
        assert answer["content"] == "Message is nested too deeply (the limit is 32 levels)."
        response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, data=text)
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "Body is nested too deeply (the limit is 32 levels)."
    # Shallow extras are fine, and echoed.
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "x"}, deep=[[[1]]]))
    assert (await bot.final(queued["object_id"]))["service_info"]["deep"] == [[[1]]]


async def test_a_stored_row_that_cannot_be_read_back_does_not_stop_a_restart(start_backend, start_balancer):
    gpu = await start_backend("kandinsky")
    balancer = await start_balancer([gpu])
    bot = await balancer.connect("telegram")
    good = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "fine"}))
    await bot.final(good["object_id"])
    await bot.close()
    await balancer.client.close()
    # A row as an earlier release could store it: service_info nested 100,000 levels.
    with sqlite3.connect(balancer.config.database_path) as db:
        db.execute(
            "INSERT INTO requests (object_id, service, executor, gen_type, settings, service_info,"
            " payload, status, created_at) VALUES (?, 'telegram', 'kandinsky', 'text2img', '{}', ?,"
            " '{\"prompt\": \"x\"}', 'queued', ?)",
            ("6b0000000000000000000001", nested(100_000), time.time()),
        )

    restarted = await start_balancer([gpu])
    assert (await restarted.client.get("/health")).status == 200
    assert (await restarted.client.get("/status.json")).status == 200
    await restarted.app[keys.SCHEDULER].backlog_loaded()  # the stored queue is read back while serving
    with sqlite3.connect(restarted.config.database_path) as db:
        status, result = db.execute(
            "SELECT status, result FROM requests WHERE object_id = ?", ("6b0000000000000000000001",)
        ).fetchone()
    assert status == "error" and "cannot be read back" in json.loads(result)["content"]
    bot = await restarted.connect("telegram")  # the queue works
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "after"}))
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"


async def test_nan_and_infinity_are_refused(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("automatic1111")])
    bot = await balancer.connect("telegram")
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(request_message("automatic1111", "text2img", {"prompt": "x"})).replace(
            '"prompt": "x"', f'"prompt": "x", "cfg_scale": {constant}'
        )
        await bot.send(text)
        answer = await bot.next_message()
        assert answer["info_type"] == "error" and f"{constant} is not a number JSON allows" in answer["content"]


async def test_the_size_limit_counts_bytes_on_both_transports(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")], MAX_MESSAGE_BYTES=2000)
    bot = await balancer.connect("telegram")
    message = request_message("kandinsky", "text2img", {"prompt": "é" * 900})  # ~1,100 chars, ~2,000 bytes
    text = json.dumps(message, ensure_ascii=False)
    assert len(text) < 2000 < len(text.encode())
    await bot.send(text)
    answer = await bot.next_message()
    assert answer["gen_status"] == "error"
    assert (
        f"Message is {len(text.encode())} bytes, over this server's limit of 2000 bytes" in answer["result"]["content"]
    )
    assert answer["service_info"] == message["service_info"]  # the bot can still route it

    response = await balancer.client.post("/api/v1/requests", headers=TELEGRAM, data=text.encode())
    assert response.status == 413
    assert "over this server's limit of 2000 bytes" in (await response.json())["error"]["message"]

    # Exactly twice the limit is still read and refused (not a dropped connection).
    await bot.send("x" * 4000)
    assert "over this server's limit" in (await bot.next_message())["content"]
    assert (await bot.submit(request_message("kandinsky", "text2img", {"prompt": "ok"})))["gen_status"] == "queued"


async def test_a_text_frame_that_is_not_utf8_is_answered_and_the_connection_carries_on(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await balancer.connect("telegram")
    request = json.dumps(request_message("kandinsky", "text2img", {"prompt": "x"})).encode()
    latin1 = request.replace(b'"prompt": "x"', b'"prompt": "caf\xe9"')  # the \xe9 alone: not UTF-8
    for frame in (latin1, b"\xff\xfe{}"):
        await bot.ws.send_frame(frame, WSMsgType.TEXT)
        answer = await bot.next_message()
        assert answer["info_type"] == "error"
        assert answer["content"].startswith("Message is not UTF-8 text: invalid")
    # The same connection still takes requests, non-ASCII ones included.
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "café"}))
    assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"


async def test_a_key_that_is_not_utf8_is_refused_with_401(start_backend, start_balancer):
    balancer = await start_balancer([await start_backend("kandinsky")])
    server = balancer.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"GET /ws/telegram HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"service: telegram\r\nauthorization: \xff\xfe\x80key\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401")


async def test_many_unknown_keys_get_a_bounded_answer_while_health_keeps_answering(start_backend, start_balancer):
    gpu = await start_backend("automatic1111")
    balancer = await start_balancer([gpu], MAX_MESSAGE_BYTES=16_000_000)
    bot = await balancer.connect("telegram")
    payload = {"prompt": "x", **{f"junk_key_{n}": n for n in range(500_000)}}
    send = asyncio.create_task(bot.send(request_message("automatic1111", "text2img", payload)))
    health_answers = []
    while not send.done() or len(health_answers) < 3:
        started = time.monotonic()
        response = await balancer.client.get("/health")
        health_answers.append((response.status, time.monotonic() - started))
        await asyncio.sleep(0.05)
    notice = await bot.next_message(lambda m: m.get("info_type") == "unknown_field", timeout_s=60)

    assert all(status == 200 for status, _ in health_answers)
    assert len(notice["unknown_fields"]) == 20
    assert "499980 more unknown keys are not listed" in notice["content"]
    assert len(json.dumps(notice)) < 5000
    await wait_until(lambda: len(gpu.state.received) == 1, timeout_s=60)
    assert len(gpu.state.received[0].body) == 500_001  # forwarded whole all the same
    print(f"longest /health answer while the frame was handled: {max(t for _, t in health_answers):.2f} s")


async def test_a_log_line_cannot_be_forged_with_a_newline_in_a_key(start_backend, start_balancer, caplog):
    balancer = await start_balancer([await start_backend("kandinsky")])
    bot = await balancer.connect("telegram")
    await bot.send(
        {
            "message_type": "request",
            "executor": "kandinsky",
            "gen_type": "text2img",
            "service_info": {"user_id": "x\nINFO forged line"},
            "payload": {"prompt": "x"},
        }
    )
    await bot.next_message()
    assert not any(
        "forged line" in line and not line.startswith("refused")
        for record in caplog.records
        for line in record.getMessage().splitlines()[1:]
    )
    assert balancer.app[keys.SCHEDULER].running


async def test_a_client_that_stops_reading_holds_no_backend_and_is_cut_off(start_backend, start_balancer, caplog):
    gpu = await start_backend("kandinsky")
    balancer = await start_balancer([gpu], SEND_TIMEOUT_S=1)
    stuck = await balancer.connect("discord")  # sends, then never reads again
    padding = "p" * 3_000_000  # echoed in each final: megabytes the stuck client never reads
    for n in range(8):
        await stuck.send(request_message("kandinsky", "text2img", {"prompt": f"stuck {n}", "padding": padding}))

    normal = await balancer.connect("telegram")
    for n in range(10):
        queued = await normal.submit(request_message("kandinsky", "text2img", {"prompt": f"normal {n}"}))
        assert (await normal.final(queued["object_id"], timeout_s=10))["gen_status"] == "ok"

    store = balancer.app[keys.STORE]
    await wait_until(lambda: any("did not read for 1 s" in r.getMessage() for r in caplog.records))
    await wait_until(lambda: len(gpu.state.received) == 18)  # every stuck request ran all the same
    owed = await store.reads.owed_finals("discord")
    assert owed, "the stuck client's finals wait in SQLite for its reconnect"
    reconnected = await balancer.connect("discord")
    for job in owed:
        assert (await reconnected.final(job.object_id))["gen_status"] == "ok"


async def test_a_stream_of_poison_requests_takes_no_backend_out(start_backend, start_balancer, caplog):
    """Images that pass validation but no backend can decode (AUTOMATIC1111 answers them with
    a 500): the requests are blamed, not the backends, and another service is served as usual."""
    gpus = [await start_backend("automatic1111", delay_s=0.05) for _ in range(2)]
    balancer = await start_balancer(gpus, BREAKER_FAILURES=2)
    poisoner, normal = await balancer.connect("discord"), await balancer.connect("telegram")

    async def normal_round(with_poison: bool) -> tuple[list[float], list[str]]:
        poison_ids, normal_sent = [], {}
        for n in range(12):
            if with_poison:
                poison = await poisoner.submit(
                    request_message("automatic1111", "img2img", {"prompt": "p", "init_images": [broken_png_base64()]})
                )
                poison_ids.append(poison["object_id"])
            queued = await normal.submit(request_message("automatic1111", "text2img", {"prompt": f"normal {n}"}))
            normal_sent[queued["object_id"]] = time.monotonic()
        latencies = []
        for object_id, sent in normal_sent.items():
            assert (await normal.final(object_id))["gen_status"] == "ok"
            latencies.append(time.monotonic() - sent)
        return sorted(latencies), poison_ids

    alone, _ = await normal_round(with_poison=False)
    latencies, poison_ids = await normal_round(with_poison=True)
    for object_id in poison_ids:
        final = await poisoner.final(object_id)
        assert final["gen_status"] == "error"
        assert final["result"]["content"].startswith("invalid_input: the request failed on 2 backends")
        assert "Invalid encoded image" in final["result"]["content"]

    assert not any("taken out of service" in record.getMessage() for record in caplog.records)
    assert {backend["state"] for backend in balancer.app[keys.SCHEDULER].fleet.backends_status()} <= {"healthy", "busy"}
    print(
        f"12 normal requests alone: median {alone[6]:.2f} s, worst {alone[-1]:.2f} s; beside 12 "
        f"poison requests: median {latencies[6]:.2f} s, worst {latencies[-1]:.2f} s"
    )
