"""The server as an operator runs it: one server per database, the port and folders checked
before any job is touched, signals logged, a second signal exits at once, and a shutdown
that answers every request it committed and stops abandoned GPU work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys

import aiohttp

from app.demo_backends import DemoBackendState, automatic1111_app, serve_on_loopback
from bench.bots import Bot, request_message, wait_until
from bench.processes import REPO_ROOT, ServerProcess
from tests.conftest import SERVICE_KEYS, base_env, write_executors


async def run_to_exit(env: dict[str, str], cwd, timeout_s: float = 20.0, *args: str) -> tuple[int, str]:
    """Start `python -m app [args]` and wait for it to exit by itself."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(timeout_s):
        output, _ = await process.communicate()
    return process.returncode, output.decode()


def attempts_of(database_path, object_id: str) -> tuple[str, int]:
    with sqlite3.connect(database_path) as db:
        return db.execute("SELECT status, attempts FROM requests WHERE object_id = ?", (object_id,)).fetchone()


async def connect(session: aiohttp.ClientSession, server: ServerProcess, service: str = "telegram") -> Bot:
    ws = await session.ws_connect(
        f"{server.base_url}/ws/{service}", headers={"authorization": SERVICE_KEYS[service], "service": service}
    )
    return Bot(ws)


async def connect_demo(session: aiohttp.ClientSession, server: ServerProcess) -> Bot:
    """A bot of TEST_MODE's demo service."""
    ws = await session.ws_connect(
        f"{server.base_url}/ws/test", headers={"authorization": "demo-key", "service": "test"}
    )
    return Bot(ws)


async def test_a_second_server_on_the_same_database_refuses_to_start(tmp_path, start_backend, unused_tcp_port_factory):
    gpu = await start_backend("automatic1111")
    gpu.state.gate.clear()
    write_executors(tmp_path, [gpu])
    env = base_env(tmp_path, unused_tcp_port_factory())
    first = ServerProcess(env, tmp_path / "first.log")
    await first.start()
    try:
        async with aiohttp.ClientSession() as session:
            bot = await connect(session, first)
            queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "x"}))
            await wait_until(lambda: gpu.state.running == 1)

            code, output = await run_to_exit(env, tmp_path)  # same database, same port

            assert code == 2
            assert output.strip() == (
                f"devoid: cannot start: another server (pid {first.process.pid}) "
                f"is already using DATABASE_PATH={env['DATABASE_PATH']}"
            )
            # The first server's job was not touched, let alone run twice.
            assert attempts_of(env["DATABASE_PATH"], queued["object_id"]) == ("generating", 1)
            assert len(gpu.state.received) == 1
            gpu.state.gate.set()
            assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    finally:
        await first.stop()


async def test_a_port_in_use_or_an_unusable_folder_is_one_line_and_exit_2(tmp_path, unused_tcp_port_factory):
    port = unused_tcp_port_factory()
    with socket_listening(port):
        code, output = await run_to_exit(base_env(tmp_path, port, TEST_MODE=1, SERVICES=""), tmp_path)
    assert (code, output.strip()) == (2, f"devoid: cannot start: API_PORT={port} on 127.0.0.1 is already in use")
    assert not (tmp_path / "data" / "devoid.sqlite3").exists()  # nothing was opened

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = await run_to_exit(
        base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", IMAGES_PATH=blocker / "images"),
        tmp_path,
    )
    assert code == 2 and output.startswith(f"devoid: cannot start: IMAGES_PATH={blocker / 'images'} is not usable")
    assert len(output.strip().splitlines()) == 1

    # The folder of large payloads beside the database is checked the same way.
    payload_folder = tmp_path / "data" / "devoid.sqlite3.payloads"
    payload_folder.rmdir()  # made, empty, by the start above (folders are checked in order)
    payload_folder.write_text("")
    code, output = await run_to_exit(base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES=""), tmp_path)
    assert (code, output.strip()) == (
        2,
        f"devoid: cannot start: DATABASE_PATH={payload_folder} is not usable: File exists",
    )


class socket_listening:
    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


async def test_listening_is_logged_once_started_and_signals_are_logged(tmp_path, unused_tcp_port_factory):
    server = ServerProcess(
        base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES=""), tmp_path / "server.log"
    )
    await server.start()
    server.process.send_signal(signal.SIGTERM)
    assert await server.wait() == 0
    log = server.log()
    assert log.index("scheduler started") < log.index("listening on")
    assert "SIGTERM received: shutting down" in log
    steps = [
        "shutdown: refusing new requests",
        "shutdown: client connections closed",
        "shutdown: stopping the scheduler",
        "shutdown: scheduler stopped",
        "shutdown: database closed",
    ]
    assert [log.index(step) for step in steps] == sorted(log.index(step) for step in steps)
    assert log.rstrip().endswith("stopped")


async def test_misspelled_settings_and_an_empty_backend_list_are_warned_about_by_name(
    tmp_path, unused_tcp_port_factory
):
    write_executors(tmp_path, [])
    (tmp_path / ".env").write_text("LOGING_LEVEL=DEBUG\n")
    env = base_env(tmp_path, unused_tcp_port_factory(), API_PROT="9000")
    server = ServerProcess(env, tmp_path / "server.log", cwd=tmp_path)
    await server.start()
    await server.stop()
    log = server.log()
    assert (
        "API_PROT (environment or .env) is not a setting of this server and is ignored; did you mean API_PORT?" in log
    )
    assert "LOGING_LEVEL (environment or .env) is not a setting of this server and is ignored; did you mean" in log
    assert "lists no backends: every request is refused (no_backend)" in log


async def test_devoid_check_passes_a_good_configuration_and_names_what_is_wrong_in_a_bad_one(
    tmp_path, start_backend, unused_tcp_port_factory
):
    gpu = await start_backend("automatic1111", name="gpu-good")
    write_executors(tmp_path, [gpu])
    env = base_env(tmp_path, unused_tcp_port_factory())
    status, output = await run_to_exit(env, tmp_path, 30.0, "check")
    assert status == 0, output
    assert "ok    backend gpu-good" in output and "answers" in output
    assert "does not exist yet; it is created at start-up" in output
    assert output.rstrip().endswith("nothing wrong")
    assert not (tmp_path / "images").exists()  # a check changes nothing
    assert not (tmp_path / "data" / "devoid.sqlite3").exists()

    dead = {**gpu.entry(), "name": "gpu-gone", "endpoint": f"http://127.0.0.1:{unused_tcp_port_factory()}/sdapi/v1"}
    write_executors(tmp_path, [gpu, dead])
    status, output = await run_to_exit({**env, "SERVICE_BURST": "7", "MAX_USER_REQUEST": "3"}, tmp_path, 30.0, "check")
    assert status == 1, output
    assert "FAIL  backend gpu-gone" in output and "health probe failed" in output
    assert "warn  setting MAX_USER_REQUEST" in output and "did you mean MAX_USER_REQUESTS?" in output
    assert output.rstrip().endswith("1 wrong")

    status, output = await run_to_exit({**env, "API_PORT": "eighty"}, tmp_path, 30.0, "check")
    assert status == 1 and "FAIL  settings                 API_PORT: expected a port number" in output

    write_executors(tmp_path, [gpu])
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "devoid.sqlite3.payloads").write_text("")  # a file where its folder goes
    status, output = await run_to_exit(env, tmp_path, 30.0, "check")
    assert status == 1 and "FAIL  folder DATABASE_PATH.payloads" in output and "is not a writable folder" in output
    assert output.rstrip().endswith("1 wrong")


async def test_devoid_help_and_version_start_nothing(tmp_path):
    status, output = await run_to_exit({"TEST_MODE": "1"}, tmp_path, 20.0, "--help")
    assert status == 0 and "check" in output and "usage: devoid" in output
    status, output = await run_to_exit({"TEST_MODE": "1"}, tmp_path, 20.0, "--version")
    assert status == 0 and output.startswith("devoid ")


async def test_a_second_ctrl_c_exits_at_once_and_loses_nothing(tmp_path, unused_tcp_port_factory):
    env = base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=30, SHUTDOWN_GRACE_S=60)
    server = ServerProcess(env, tmp_path / "server.log")
    await server.start()
    async with aiohttp.ClientSession() as session:
        bot = await connect_demo(session, server)
        queued = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "slow"}))
        await bot.next_message(lambda m: m.get("gen_status") == "generating")

        server.process.send_signal(signal.SIGINT)  # waits up to 60 s for the running job...
        await wait_until(lambda: "SIGINT received" in server.log())
        server.process.send_signal(signal.SIGINT)  # ...unless asked again
        async with asyncio.timeout(5):
            code = await server.wait()
    assert code == 130
    assert server.log().strip().splitlines()[-1] == (
        "devoid: SIGINT again during shutdown: exiting now; queued and running requests resume at the next start"
    )
    assert "Traceback" not in server.log()

    restarted = ServerProcess({**env, "DEMO_DELAY_S": "0"}, tmp_path / "restarted.log")
    await restarted.start()
    try:
        async with aiohttp.ClientSession() as session:
            bot = await connect_demo(session, restarted)
            assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    finally:
        await restarted.stop()


async def test_test_mode_honours_the_shutdown_grace(tmp_path, unused_tcp_port_factory):
    env = base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=60, SHUTDOWN_GRACE_S=0.5)
    server = ServerProcess(env, tmp_path / "server.log")
    await server.start()
    async with aiohttp.ClientSession() as session:
        bot = await connect_demo(session, server)
        await bot.submit(request_message("automatic1111", "text2img", {"prompt": "slow"}))
        await bot.next_message(lambda m: m.get("gen_status") == "generating")
        server.process.send_signal(signal.SIGTERM)
        # The demo job would take a minute: the server does not wait for it.
        async with asyncio.timeout(15):
            assert await server.wait() == 0
    log = server.log()
    assert "running jobs cancelled" in log
    assert "told demo-automatic1111 to interrupt its abandoned job" in log


async def test_an_abandoned_automatic1111_job_is_interrupted_and_not_counted_as_an_attempt(
    tmp_path, start_backend, unused_tcp_port_factory
):
    gpu = await start_backend("automatic1111", delay_s=60)
    write_executors(tmp_path, [gpu])
    env = base_env(tmp_path, unused_tcp_port_factory(), SHUTDOWN_GRACE_S=0.3, MAX_ATTEMPTS=1)
    server = ServerProcess(env, tmp_path / "server.log")
    await server.start()
    async with aiohttp.ClientSession() as session:
        bot = await connect(session, server)
        queued = await bot.submit(request_message("automatic1111", "text2img", {"prompt": "x"}))
        await wait_until(lambda: gpu.state.running == 1)
        await server.stop()
    assert gpu.state.interrupts == 1  # the GPU was told to stop working for nobody

    gpu.state.delay_s = 0
    restarted = ServerProcess(env, tmp_path / "restarted.log")
    await restarted.start()
    try:
        async with aiohttp.ClientSession() as session:
            bot = await connect(session, restarted)
            # MAX_ATTEMPTS=1: had the restart counted as a failed attempt, this would be an error.
            assert (await bot.final(queued["object_id"]))["gen_status"] == "ok"
    finally:
        await restarted.stop()


async def test_every_request_committed_before_sigterm_got_its_queued(tmp_path, unused_tcp_port_factory):
    env = base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=0.01)
    server = ServerProcess(env, tmp_path / "server.log")
    await server.start()
    heard: set[str] = set()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{server.base_url}/ws/test", headers={"authorization": "demo-key", "service": "test"}
        )
        for n in range(400):
            await ws.send_str(json.dumps(request_message("kandinsky", "text2img", {"prompt": f"burst {n}"})))
        answered = 0
        async for frame in ws:  # read until the server closes the connection
            message = json.loads(frame.data)
            if message.get("gen_status") == "queued":
                heard.add(message["object_id"])
            if message.get("message_type") == "response":
                answered += 1
                if answered == 100:
                    server.process.send_signal(signal.SIGTERM)
    assert await server.wait() == 0
    with sqlite3.connect(env["DATABASE_PATH"]) as db:
        committed = {row[0] for row in db.execute("SELECT object_id FROM requests")}
    assert committed, "the burst was not under way when the signal came"
    assert committed - heard == set()  # nothing committed without its `queued`


async def test_test_mode_demo_backends_remember_only_their_latest_calls():
    state = DemoBackendState(keep_received=2)
    runner, url = await serve_on_loopback(automatic1111_app(state))
    try:
        async with aiohttp.ClientSession() as session:
            for number in range(3):
                body = {"prompt": f"call {number}", "width": 64, "height": 64}
                async with session.post(f"{url}/sdapi/v1/txt2img", json=body) as response:
                    assert response.status == 200
    finally:
        await runner.cleanup()
    assert [call.body["prompt"] for call in state.received] == ["call 1", "call 2"]
