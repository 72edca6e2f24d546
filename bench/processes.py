"""The balancer as a real process, for tests that kill it or read what it prints."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 20.0


async def wait_until_answering(base_url: str, exited: Callable[[], str | None]) -> None:
    """Poll `GET base_url/` until it answers 200, at most READY_TIMEOUT_S. `exited()` says why
    the process is gone (raised at once), or None while it runs."""
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                reason = exited()
                if reason is not None:
                    raise RuntimeError(reason)
                try:
                    async with session.get(base_url + "/") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)


class ServerProcess:
    """`python -m app` with the given environment, its output in `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.cwd = cwd or log_path.parent
        self.process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['API_PORT']}"

    async def start(self) -> None:
        # A clean environment: only what the test sets, so nothing from .env or the shell leaks in.
        # It runs in its own folder (where a test may put a .env), importing the app from here.
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **self.env}
        with open(self.log_path, "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", cwd=self.cwd, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
            )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        def exited() -> str | None:
            code = self.process.returncode if self.process else None
            return None if code is None else f"server exited {code}: {self.log()}"

        await wait_until_answering(self.base_url, exited)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class MongoProcess:
    """The MongoDB wire-protocol test server (tests/mongo_server.py) in a process of its own,
    so the mirror's traffic costs the bench's own process (the load) nothing."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.uri = ""

    async def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.mongo_server", cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.uri = (await self.process.stdout.readline()).decode().strip()
        if not self.uri:
            raise RuntimeError("the MongoDB test server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
