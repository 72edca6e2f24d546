"""Shared fixtures: real servers on real sockets, a real SQLite file per test."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.config import Config
from app.demo_backends import DemoBackendState, automatic1111_app, kandinsky_app
from app.domain.ids import new_object_id
from app.domain.jobs import ExecutorType, GenType, Job
from app.main import create_app
from app.storage.store import Store
from bench.bots import Bot
from tests.mirror_servers import MongoServer, S3Server

SERVICE_KEYS = {"telegram": "tg-key", "discord": "dc-key", "test": "test-key"}
KANDINSKY_TOKEN = "kandinsky-token"


@dataclass
class RunningBackend:
    """A test GPU server speaking a real backend contract (docs/backends.md) on a loopback port."""

    name: str
    exec_type: str
    url: str
    state: DemoBackendState
    server: TestServer
    restart_server: Callable[[], Awaitable[TestServer]]

    def entry(self, **extra: Any) -> dict[str, Any]:
        """Its EXECUTORS_FILE entry, in the original's format."""
        endpoint = f"{self.url}/sdapi/v1" if self.exec_type == "automatic1111" else self.url
        return {
            "name": self.name,
            "gpu": "test",
            "timeout": 30,
            "model": "test",
            "exec_type": self.exec_type,
            "endpoint": endpoint,
            **extra,
        }

    async def stop(self) -> None:
        """Close the port: connections are refused, as when the GPU box is off."""
        await self.server.close()

    async def restart(self) -> None:
        self.server = await self.restart_server()


@pytest.fixture
def start_backend(aiohttp_server, unused_tcp_port_factory) -> Callable[..., Awaitable[RunningBackend]]:
    """start_backend("automatic1111", delay_s=0.1) -> a running test backend."""
    counter = {"n": 0}

    async def start(
        exec_type: str, *, delay_s: float = 0.0, units_per_s: float | None = None, name: str | None = None
    ) -> RunningBackend:
        counter["n"] += 1
        state = DemoBackendState(delay_s=delay_s, units_per_s=units_per_s, api_token=KANDINSKY_TOKEN)
        make_app = automatic1111_app if exec_type == "automatic1111" else kandinsky_app
        port = unused_tcp_port_factory()

        async def serve() -> TestServer:
            return await aiohttp_server(make_app(state), host="127.0.0.1", port=port)

        return RunningBackend(
            name or f"{exec_type}-{counter['n']}", exec_type, f"http://127.0.0.1:{port}", state, await serve(), serve
        )

    return start


def base_env(tmp_path: Path, port: int, **overrides: Any) -> dict[str, str]:
    """The environment a self-hoster would write, pointing every file into tmp_path."""
    env = {
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "SERVICES": " ".join(f"{name}:{key}" for name, key in SERVICE_KEYS.items()),
        "DATABASE_PATH": str(tmp_path / "data" / "devoid.sqlite3"),
        "EXECUTORS_FILE": str(tmp_path / "data" / "executors.json"),
        "IMAGES_PATH": str(tmp_path / "images"),
        "SPOOL_PATH": str(tmp_path / "spool"),
        "KANDINSKY_API_TOKEN": KANDINSKY_TOKEN,
        "SHUTDOWN_GRACE_S": "1",
        # Retries and probes on a test's time scale.
        "RETRY_BACKOFF_S": "0.05",
        "PROBE_BACKOFF_MAX_S": "0.2",
        "LOGGING_LEVEL": "INFO",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def write_executors(tmp_path: Path, backends: list[RunningBackend | dict[str, Any]]) -> None:
    path = tmp_path / "data" / "executors.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [b.entry() if isinstance(b, RunningBackend) else b for b in backends]
    path.write_text(json.dumps(entries))


def new_job(**changes: Any) -> Job:
    """A queued text2img request as intake builds it, for tests of the parts below intake."""
    fields: dict[str, Any] = dict(
        object_id=new_object_id(),
        service="telegram",
        executor=ExecutorType.KANDINSKY,
        gen_type=GenType.TEXT2IMG,
        premium=False,
        settings={},
        service_info={"user_id": 1},
        payload={"prompt": "x"},
        created_at=time.time(),
    )
    return Job(**(fields | changes))


def cancel_action(object_id: str) -> dict:
    """The additive `cancel` action for one request."""
    return {"message_type": "info", "action": "cancel", "object_id": object_id}


@contextlib.contextmanager
def database_refusing_writes(path: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock: every commit of the server waits out its
    busy timeout and fails ("database is locked"), as on a full or read-only disk."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@dataclass
class Balancer:
    """The real server under test, and a way to connect bots to it."""

    config: Config
    client: TestClient
    app: web.Application

    async def connect(self, service: str = "telegram", *, path: str | None = None, key: str | None = None) -> Bot:
        ws = await self.client.ws_connect(
            path or f"/ws/{service}", headers={"authorization": key or SERVICE_KEYS[service], "service": service}
        )
        return Bot(ws)


@pytest.fixture
def start_balancer(tmp_path, aiohttp_client, unused_tcp_port_factory):
    """start_balancer([backend, ...], **env) -> the server running on a free port."""

    async def start(backends: list[RunningBackend], **env: Any) -> Balancer:
        write_executors(tmp_path, backends)
        port = unused_tcp_port_factory()
        config = Config.from_env(base_env(tmp_path, port, **env))
        app = create_app(config)
        client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
        return Balancer(config, client, app)

    return start


@pytest.fixture
async def open_store():
    """open_store(path, **options) -> Store.open(path, **options), closed when the test ends
    if it is still open. A store left open (its test failed before closing it) keeps pytest
    from exiting: the database's threads are not daemon threads."""
    opened: list[Store] = []

    async def open_(path: Path, **options: Any) -> Store:
        store = await Store.open(path, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()  # a second close does nothing


@pytest.fixture
async def s3_server(unused_tcp_port_factory):
    """moto's S3 server with the images bucket created."""
    server = S3Server(unused_tcp_port_factory())
    await server.start()
    await server.create_bucket()
    yield server
    await server.stop()


@pytest.fixture
async def mongo_server(unused_tcp_port_factory):
    server = MongoServer(unused_tcp_port_factory(), database=f"devoid_test_{uuid.uuid4().hex[:8]}")
    await server.start()
    yield server
    if not server.stoppable:
        await server.drop()
    await server.stop()
