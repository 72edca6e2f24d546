"""`python -m app.client` against a server with demo backends: it shows the way through the
queue, saves a real image and exits 0; it exits non-zero with a readable message otherwise. It
only ever handles its own request: results waiting for the service's bots stay theirs, and
Ctrl-C or --timeout cancels the request."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from app.client import server_url
from bench.bots import Bot, request_message
from bench.processes import REPO_ROOT, ServerProcess
from tests.conftest import base_env

DEMO_HEADERS = {"authorization": "demo-key", "service": "test"}


@pytest.fixture
async def demo_server(tmp_path, unused_tcp_port_factory):
    server = ServerProcess(
        base_env(
            tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=0.5, PROGRESS_INTERVAL_S=0.1
        ),
        tmp_path / "server.log",
    )
    await server.start()
    yield server
    await server.stop()


# The client as started from a terminal, where Ctrl-C is not ignored. A process started in the
# background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then
# leaves it ignored, so a test run that way could not interrupt the client at all.
FROM_A_TERMINAL = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('app.client', run_name='__main__', alter_sys=True)"
)


async def start_client(cwd: Path, *args: str, ctrl_c: bool = False) -> asyncio.subprocess.Process:
    """The command-line client as a process; with `ctrl_c`, one that Ctrl-C (SIGINT) reaches
    whatever the test run's own signal state."""
    env = {key: value for key, value in os.environ.items() if key not in ("DEVOID_URL", "API_HOST", "API_PORT")}
    how = ["-c", FROM_A_TERMINAL] if ctrl_c else ["-m", "app.client"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *how,
        *args,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_client(cwd: Path, *args: str) -> tuple[int, str, str]:
    process = await start_client(cwd, *args)
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("executor", ["kandinsky", "automatic1111"])
async def test_the_client_saves_a_valid_image(tmp_path, demo_server, executor):
    output = tmp_path / "lighthouse.jpg"
    code, stdout, stderr = await run_client(
        tmp_path, "a lighthouse at dusk", "--url", demo_server.base_url, "--executor", executor, "--output", str(output)
    )

    assert code == 0, stderr
    assert stdout.strip() == f"saved {output}"
    with Image.open(output) as image:
        assert image.format == "JPEG" and image.width > 0
    lines = stderr.splitlines()
    assert lines[0].startswith("object_id ") and len(lines[0].split()[1]) == 24
    assert lines[1].startswith("queued") and "ETA" in lines[1]
    assert lines[-1] == "ok"
    if executor == "automatic1111":  # progress is polled from AUTOMATIC1111 only
        assert any(line.startswith("generating [") and "%" in line for line in lines)


async def test_a_wrong_key_exits_non_zero_with_a_readable_message(tmp_path, demo_server):
    code, stdout, stderr = await run_client(tmp_path, "x", "--url", demo_server.base_url, "--key", "nope")
    assert code == 2 and stdout == ""
    assert stderr.strip() == "error: the server refused service 'test' with this key (HTTP 401)"


async def test_an_unreachable_server_exits_non_zero(tmp_path, unused_tcp_port_factory):
    url = f"http://127.0.0.1:{unused_tcp_port_factory()}"
    code, _, stderr = await run_client(tmp_path, "x", "--url", url)
    assert code == 3 and stderr.startswith(f"error: cannot reach the server at {url}")


async def test_a_request_the_server_refuses_exits_non_zero(tmp_path, demo_server):
    code, _, stderr = await run_client(tmp_path, "x", "--url", demo_server.base_url, "--steps", "0")
    assert code == 1
    assert "payload.steps: Must be greater than or equal to 1" in stderr


async def test_the_client_leaves_results_waiting_for_the_bots_alone(tmp_path, demo_server):
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{demo_server.base_url}/ws/test", headers=DEMO_HEADERS)
        bot = Bot(ws)
        waiting = await bot.submit(request_message("kandinsky", "text2img", {"prompt": "the bot's"}))
        await ws.close()  # its result will wait for the service's next connection
        await asyncio.sleep(1.0)  # done by now (DEMO_DELAY_S=0.5)

        output = tmp_path / "mine.jpg"
        code, _, stderr = await run_client(
            tmp_path, "a brand new prompt", "--url", demo_server.base_url, "--output", str(output)
        )
        assert code == 0, stderr
        mine = stderr.splitlines()[0].split()[1]
        assert mine != waiting["object_id"]

        ws = await session.ws_connect(f"{demo_server.base_url}/ws/test", headers=DEMO_HEADERS)
        final = await Bot(ws).final(waiting["object_id"])  # still there for the bot
        assert final["payload"] == {"prompt": "the bot's"}
        await ws.close()


@pytest.fixture
async def slow_demo_server(tmp_path, unused_tcp_port_factory):
    """Demo backends that take 30 s per image: requests stay running while a test acts."""
    server = ServerProcess(
        base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="", DEMO_DELAY_S=30),
        tmp_path / "server.log",
    )
    await server.start()
    yield server
    await server.stop()


async def test_ctrl_c_cancels_the_request_in_one_line(tmp_path, slow_demo_server):
    server = slow_demo_server
    client = await start_client(tmp_path, "slow", "--url", server.base_url, ctrl_c=True)
    first_line = (await asyncio.wait_for(client.stderr.readline(), 15)).decode()
    object_id = first_line.split()[1]
    await asyncio.wait_for(client.stderr.readline(), 15)  # queued: the server has it
    client.send_signal(signal.SIGINT)
    try:
        async with asyncio.timeout(15):
            stdout, stderr = await client.communicate()
    except TimeoutError:
        # Say what each side was doing: the client's lines so far, the server's last ones.
        client.kill()
        _, stderr = await client.communicate()
        raise AssertionError(
            f"the client did not exit within 15 s of Ctrl-C.\nclient:\n{stderr.decode()[-2000:]}\n"
            f"server:\n{server.log()[-4000:]}"
        ) from None
    assert client.returncode == 130
    assert stderr.decode().strip().splitlines()[-1] == f"error: interrupted; request {object_id} cancelled"
    assert "Traceback" not in stderr.decode()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/api/v1/requests/{object_id}", headers=DEMO_HEADERS) as response:
            answer = await response.json()
    assert (answer["gen_status"], answer["result"]["content"]) == ("error", "cancelled")


async def test_timeout_gives_up_and_cancels(tmp_path, slow_demo_server):
    code, _, stderr = await run_client(tmp_path, "slow", "--url", slow_demo_server.base_url, "--timeout", "1")
    object_id = stderr.splitlines()[0].split()[1]
    assert code == 1
    assert stderr.strip().splitlines()[-1] == f"error: no answer within 1 s; request {object_id} cancelled"


async def test_the_default_url_comes_from_api_host_and_port_in_dot_env(tmp_path, demo_server):
    (tmp_path / ".env").write_text(f"API_HOST=0.0.0.0\nAPI_PORT={demo_server.env['API_PORT']}\n")
    code, stdout, stderr = await run_client(tmp_path, "from .env", "--output", str(tmp_path / "x.jpg"))
    assert code == 0, stderr


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://host/ws", "http://host"),
        ("http://host/ws/test/", "http://host"),
        ("wss://bots.example.org/proxy/ws", "https://bots.example.org/proxy"),
        ("HTTPS://bots.example.org", "https://bots.example.org"),
    ],
)
def test_urls_as_people_type_them_reach_the_server(typed, meant):
    assert server_url(typed) == meant


async def test_a_url_without_a_scheme_or_with_ws_works_and_a_wrong_scheme_is_one_line(tmp_path, demo_server):
    address = demo_server.base_url.removeprefix("http://")
    code, stdout, stderr = await run_client(
        tmp_path, "no scheme", "--url", address, "--output", str(tmp_path / "a.jpg")
    )
    assert code == 0, stderr
    code, _, stderr = await run_client(
        tmp_path, "with ws", "--url", f"{demo_server.base_url}/ws", "--output", str(tmp_path / "b.jpg")
    )
    assert code == 0, stderr
    code, _, stderr = await run_client(tmp_path, "x", "--url", "ftp://host")
    assert code == 2 and stderr.strip().splitlines()[-1].endswith(
        "--url: expected a server address such as http://127.0.0.1:8080, got 'ftp://host'"
    )


async def test_images_go_to_the_output_dir_and_json_gives_one_event_per_line(tmp_path, demo_server):
    code, stdout, stderr = await run_client(
        tmp_path, "scripted", "--url", demo_server.base_url, "--executor", "automatic1111", "--json"
    )
    assert code == 0 and stderr == "", stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "queued" and "generating" in kinds and kinds[-2:] == ["ok", "saved"]
    object_id = events[0]["object_id"]
    saved = tmp_path / "data" / "client-images" / f"{object_id}.jpg"
    assert events[-1]["path"] == str(saved.relative_to(tmp_path)) and saved.exists()
    assert all(event["object_id"] == object_id for event in events[:-1])

    code, stdout, _ = await run_client(tmp_path, "x", "--url", demo_server.base_url, "--key", "nope", "--json")
    assert code == 2 and json.loads(stdout) == {
        "event": "error",
        "message": "the server refused service 'test' with this key (HTTP 401)",
        "exit_status": 2,
    }


@pytest.mark.parametrize("path", ["lighthouse.jpg", "data/client-images/6571c2f0a1b2c3d4e5f60718.jpg"])
def test_saved_images_are_ignored_by_git(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT, check=False).returncode == 0
