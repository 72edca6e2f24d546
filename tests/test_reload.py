"""An operator edits EXECUTORS_FILE and sends SIGHUP: backends are added, disabled and
removed without a restart, and a removed backend's running job still finishes."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from bench.bots import Bot, request_message, wait_until
from bench.processes import ServerProcess
from tests.conftest import SERVICE_KEYS, base_env, write_executors


@pytest.fixture
async def server(tmp_path, unused_tcp_port_factory):
    process = ServerProcess(base_env(tmp_path, unused_tcp_port_factory()), tmp_path / "server.log")
    yield process
    await process.stop()


async def generate(bot: Bot, prompt: str) -> dict:
    queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": prompt}))
    return await bot.final(queued["object_id"])


async def test_sighup_adds_disables_and_removes_backends(tmp_path, start_backend, server):
    first = await start_backend("kandinsky", name="first")
    second = await start_backend("kandinsky", name="second")
    write_executors(tmp_path, [first])
    await server.start()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{server.base_url}/ws/telegram", headers={"authorization": SERVICE_KEYS["telegram"], "service": "telegram"}
        )
        bot = Bot(ws)
        assert (await generate(bot, "before"))["gen_status"] == "ok"

        # Add `second`, switch `first` off.
        write_executors(tmp_path, [first.entry(disabled=True), second])
        server.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "backend second is healthy" in server.log())
        for index in range(3):
            assert (await generate(bot, f"after reload {index}"))["gen_status"] == "ok"
        assert [c.body["prompt"] for c in first.state.received] == ["before"]
        assert len(second.state.received) == 3

        # Remove `second` while it runs a job: the job still finishes; then only `first` works.
        second.state.gate.clear()
        queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "in flight"}))
        await wait_until(lambda: len(second.state.received) == 4)
        write_executors(tmp_path, [first])
        server.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "backend second leaves the pool after its job" in server.log())
        second.state.gate.set()
        assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
        assert (await generate(bot, "last"))["gen_status"] == "ok"
        assert first.state.received[-1].body["prompt"] == "last"
        assert len(second.state.received) == 4

        # A broken file is refused and the pool kept as it is.
        (tmp_path / "data" / "executors.json").write_text("[{broken")
        server.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "SIGHUP: kept the current backends: EXECUTORS_FILE:" in server.log())
        assert (await generate(bot, "still"))["gen_status"] == "ok"
        await ws.close()
