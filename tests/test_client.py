"""`python -m app.client` against a server with demo backends: it shows the way through the
queue, saves a real image and exits 0; it exits non-zero with a readable message otherwise."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import base_env
from tests.processes import REPO_ROOT, ServerProcess


@pytest.fixture
async def demo_server(tmp_path, unused_tcp_port_factory):
    server = ServerProcess(base_env(tmp_path, unused_tcp_port_factory(), TEST_MODE=1, SERVICES="",
                                    DEMO_DELAY_S=0.5, PROGRESS_INTERVAL_S=0.1), tmp_path / "server.log")
    await server.start()
    yield server
    await server.stop()


async def run_client(cwd: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.client", *args, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("executor", ["kandinsky", "automatic1111"])
async def test_the_client_saves_a_valid_image(tmp_path, demo_server, executor):
    output = tmp_path / "lighthouse.jpg"
    code, stdout, stderr = await run_client(
        tmp_path, "a lighthouse at dusk", "--url", demo_server.base_url, "--executor", executor,
        "--output", str(output))

    assert code == 0, stderr
    assert stdout.strip() == f"saved {output}"
    with Image.open(output) as image:
        assert image.format == "JPEG" and image.width > 0
    lines = stderr.splitlines()
    assert lines[0].startswith("queued") and "ETA" in lines[0]
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
