"""Builds the application (`create_app`) and runs it (`main`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from dotenv import find_dotenv, load_dotenv

from app import keys
from app.backends.base import BackendSpec
from app.config import Config, ConfigError, configure_logging
from app.delivery import ConnectionHub
from app.demo_backends import DemoBackendState, automatic1111_app, kandinsky_app
from app.executors import build_backends, load_executors
from app.jobs import ExecutorType
from app.results import ResultWriter
from app.routes import add_routes
from app.scheduler import Scheduler
from app.store import Store

log = logging.getLogger(__name__)

# Demo backends answer within DEMO_DELAY_S; this only stops a wedged one holding a job forever.
DEMO_TIMEOUT_S = 120.0
# HTTP bodies larger than a websocket message are not expected anywhere.
CLIENT_MAX_SIZE_FACTOR = 2


def create_app(config: Config) -> web.Application:
    """Wire every part. Raises ConfigError if EXECUTORS_FILE is missing or malformed."""
    app = web.Application(client_max_size=config.max_message_bytes * CLIENT_MAX_SIZE_FACTOR)
    app[keys.CONFIG] = config
    app[keys.RESULTS] = ResultWriter(save_locally=config.save_images_locally,
                                     images_path=config.images_path,
                                     url_prefix=config.image_url_prefix)
    specs = None if config.test_mode else load_executors(config.executors_file)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.STORE] = await Store.open(config.database_path,
                                             max_batch_rows=config.store_batch_rows)
        yield
        await app[keys.STORE].close()

    async def http_session_ctx(app: web.Application) -> AsyncIterator[None]:
        # No overall timeout here: each backend call gets its own from EXECUTORS_FILE.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            app[keys.HTTP_SESSION] = session
            yield

    async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
        if specs is not None:
            app[keys.BACKENDS] = build_backends(specs, app[keys.HTTP_SESSION], config.kandinsky_api_token)
            yield
            return
        async for demo_specs in _demo_backends(config):
            app[keys.BACKENDS] = build_backends(demo_specs, app[keys.HTTP_SESSION],
                                                config.kandinsky_api_token)
            yield

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.HUB] = ConnectionHub(app[keys.STORE])
        # Demo backends take DEMO_DELAY_S; a real GPU's time is learned from its first jobs.
        guess_s = config.demo_delay_s if config.test_mode and config.demo_delay_s > 0 else None
        scheduler = Scheduler(app[keys.STORE], app[keys.RESULTS], app[keys.HUB], app[keys.BACKENDS],
                              config.general_premium_ratio, initial_guess_s=guess_s)
        app[keys.SCHEDULER] = scheduler
        await scheduler.start()
        yield
        await scheduler.stop(config.shutdown_grace_s)

    async def close_connections(app: web.Application) -> None:
        await app[keys.HUB].close_all()

    # Dependency order; shutdown runs it in reverse (scheduler first, store last).
    app.cleanup_ctx.extend([store_ctx, http_session_ctx, backends_ctx, scheduler_ctx])
    app.on_shutdown.append(close_connections)
    add_routes(app)
    return app


async def _demo_backends(config: Config) -> AsyncIterator[list[BackendSpec]]:
    """Serve one demo backend of each executor type on a free loopback port."""
    runners = []
    specs = []
    for exec_type, make_app in ((ExecutorType.AUTOMATIC1111, automatic1111_app),
                                (ExecutorType.KANDINSKY, kandinsky_app)):
        state = DemoBackendState(delay_s=config.demo_delay_s, api_token=config.kandinsky_api_token)
        runner = web.AppRunner(make_app(state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        specs.append(BackendSpec(name=f"demo-{exec_type.value}", exec_type=exec_type,
                                 endpoint=f"http://127.0.0.1:{port}", timeout_s=DEMO_TIMEOUT_S,
                                 gpu="demo", model="demo"))
    log.warning("TEST_MODE=1: using demo backends (%s) instead of %s",
                ", ".join(f"{s.name} at {s.endpoint}" for s in specs), config.executors_file)
    try:
        yield specs
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    # .env of the working directory; the real environment wins over it (override=False).
    load_dotenv(find_dotenv(usecwd=True), override=False)
    try:
        config = Config.from_env(os.environ)
        configure_logging(config.logging_level)
        app = create_app(config)
    except ConfigError as exc:
        print(f"devoid: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("listening on http://%s:%d (services: %s)", config.api_host, config.api_port,
             ", ".join(sorted(config.services)))
    web.run_app(app, host=config.api_host, port=config.api_port, print=None,
                shutdown_timeout=config.shutdown_grace_s + 5)
