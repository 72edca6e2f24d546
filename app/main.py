"""Builds the application (`create_app`) and runs it (`main`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from dotenv import find_dotenv, load_dotenv

from app import checkup, keys
from app.backends.base import Backend, BackendSpec
from app.config import Config, ConfigError, configure_logging, unknown_settings
from app.demo_backends import DemoBackendState, automatic1111_app, kandinsky_app, serve_on_loopback
from app.domain.costs import REFERENCE_JOB_UNITS, REFERENCE_UNITS_PER_S
from app.domain.jobs import ExecutorType
from app.engine.admission import Admission
from app.engine.scheduler import Scheduler
from app.executors import build_backend, load_executors
from app.image_check import ImageCheck
from app.loop_lag import LoopLag
from app.metrics import Metrics, live_families
from app.mirrors.outbox import OutboxWorker
from app.mirrors.records import request_record
from app.mirrors.s3 import S3Mirror
from app.moderation import Moderator
from app.process import (
    EXIT_CANNOT_START,
    CannotStart,
    DatabaseLock,
    bind,
    check_writable_folder,
    on_stop_signals,
    pace_cycle_collector,
)
from app.storage.payload_files import PayloadFiles
from app.storage.results import ImageSecretUnusable, ResultWriter, image_url_secret
from app.storage.retention import Retention
from app.storage.store import Store
from app.web.access_log import QuietPollingAccessLogger
from app.web.api import api_errors
from app.web.byte_budget import ByteBudget
from app.web.delivery import ConnectionHub
from app.web.gateway import LARGE_MESSAGES_BYTES
from app.web.intake import Intake
from app.web.openapi import build_spec
from app.web.pages import SERVER_NAME, VERSION
from app.web.routes import add_routes
from app.web.status_history import StatusHistory

log = logging.getLogger(__name__)

# How long the reference GPU takes for a default-sized job (app/domain/costs.py).
DEMO_TYPICAL_JOB_S = REFERENCE_JOB_UNITS / REFERENCE_UNITS_PER_S
# What TEST_MODE's demo backends remember of the calls they served (the latest ones).
DEMO_CALLS_KEPT = 100
# HTTP bodies larger than a websocket message are not expected anywhere.
CLIENT_MAX_SIZE_FACTOR = 2


def create_app(config: Config) -> web.Application:
    """Wire every part. Raises ConfigError if EXECUTORS_FILE is missing or malformed."""
    app = web.Application(client_max_size=config.max_message_bytes * CLIENT_MAX_SIZE_FACTOR, middlewares=[api_errors])
    app[keys.CONFIG] = config
    app[keys.METRICS] = Metrics()
    app[keys.OPENAPI] = build_spec(SERVER_NAME, VERSION)
    app[keys.LARGE_MESSAGES] = ByteBudget(LARGE_MESSAGES_BYTES)
    app[keys.RESULTS] = ResultWriter(
        save_locally=config.save_images_locally,
        images_path=config.images_path,
        url_prefix=config.image_url_prefix,
        spool_path=config.spool_path,
        s3_url_prefix=config.s3_image_endpoint if config.s3_enabled else None,
        url_secret=image_url_secret(config.image_url_secret, config.database_path),
    )
    # A bad file stops start-up here, before anything is served.
    file_specs = None if config.test_mode else load_executors(config.executors_file)
    if file_specs == []:
        log.warning(
            "EXECUTORS_FILE %s lists no backends: every request is refused (no_backend) until some are "
            "added (SIGHUP re-reads the file)",
            config.executors_file,
        )
    moderator = Moderator.load(config.moderation_rules_file)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[keys.STORE] = await Store.open(
            config.database_path,
            max_batch_rows=config.store_batch_rows,
            record_of=request_record if config.mongodb_enabled else None,
        )
        yield
        await app[keys.STORE].close()
        log.info("shutdown: database closed")

    async def http_session_ctx(app: web.Application) -> AsyncIterator[None]:
        # No overall timeout here: each backend call gets its own, from its expected duration.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            app[keys.HTTP_SESSION] = session
            yield

    async def mirrors_ctx(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app[keys.MIRRORS] = await _open_mirrors(config, app[keys.STORE], stack)
            for mirror in app[keys.MIRRORS]:
                app[keys.STORE].outbox_listeners[mirror.target] = mirror.notify
                mirror.start()
            yield
            for mirror in app[keys.MIRRORS]:
                await mirror.stop()
            if app[keys.MIRRORS]:
                log.info("shutdown: mirrors stopped (their unfinished work waits in the outbox)")

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        session = app[keys.HTTP_SESSION]

        def make_backend(spec: BackendSpec) -> Backend:
            return build_backend(spec, session, config.kandinsky_api_token)

        async with _backend_specs(config, file_specs) as initial_specs:
            app[keys.HUB] = ConnectionHub(app[keys.STORE], config.send_timeout_s)
            uploads = next((m for m in app[keys.MIRRORS] if isinstance(m, S3Mirror)), None)
            scheduler = Scheduler(
                config,
                app[keys.STORE],
                app[keys.RESULTS],
                app[keys.HUB],
                [make_backend(spec) for spec in initial_specs],
                make_backend,
                admission=Admission(config, moderator, app[keys.METRICS]),
                image_check=(
                    ImageCheck(config.image_check_url, session, config.image_check_timeout_s)
                    if config.image_check_url
                    else None
                ),
                uploads=uploads,
                metrics=app[keys.METRICS],
            )
            app[keys.SCHEDULER] = scheduler
            app[keys.INTAKE] = Intake(app[keys.STORE], scheduler, app[keys.HUB], scheduler.admission)
            app[keys.METRICS].watch(
                lambda: live_families(
                    scheduler.fleet.queues_status(),
                    scheduler.fleet.backends_status(),
                    [mirror.health.as_dict() for mirror in app[keys.MIRRORS]],
                )
            )
            await scheduler.start()
            app[keys.STATUS_HISTORY] = StatusHistory(scheduler, app[keys.METRICS])
            sampling = asyncio.create_task(app[keys.STATUS_HISTORY].run(), name="status-history")
            reload_on_hangup(config, scheduler)
            yield
            sampling.cancel()
            stop_reloading_on_hangup()
            log.info("shutdown: stopping the scheduler (running jobs get up to %g s)", config.shutdown_grace_s)
            await scheduler.stop(config.shutdown_grace_s)
            log.info("shutdown: scheduler stopped")

    async def loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
        # First in, last out: the start-up (the line read back) and the shutdown are watched too.
        async with _running(LoopLag(app[keys.METRICS]).run(), "loop-lag"):
            yield

    async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
        if not config.retention_s:
            yield
            return
        retention = Retention(
            app[keys.STORE], config.images_path, config.retention_s, config.summary_retention_s, app[keys.METRICS]
        )
        async with _running(retention.run(), "retention"):
            yield

    async def close_connections(app: web.Application) -> None:
        await app[keys.HUB].close_all()
        log.info("shutdown: client connections closed")

    # Dependency order; shutdown runs it in reverse (scheduler first, store last).
    app.cleanup_ctx.extend([loop_lag_ctx, store_ctx, mirrors_ctx, http_session_ctx, scheduler_ctx, retention_ctx])
    app.on_shutdown.append(close_connections)
    add_routes(app)
    return app


async def _open_mirrors(config: Config, store: Store, stack: contextlib.AsyncExitStack) -> list[OutboxWorker]:
    """The configured mirrors, their clients closed by `stack`. Nothing here waits for a
    mirror server: an unreachable one is reported by its worker, which keeps retrying."""
    # Each mirror's client library is imported only when it is configured (botocore and
    # pymongo take half a second to import; a restart is that much faster without them).
    mirrors: list[OutboxWorker] = []
    if config.mongodb_enabled:
        from app.mirrors import mongodb

        client = mongodb.open_client(config)
        stack.push_async_callback(client.close)
        mirrors.append(mongodb.MongoMirror(store, config, client))
    if config.s3_enabled:
        from app.mirrors import s3

        client = await stack.enter_async_context(s3.open_client(config))
        mirrors.append(s3.S3Mirror(store, config, client))
    if mirrors:
        log.info("mirrors: %s", ", ".join(mirror.target for mirror in mirrors))
    return mirrors


@contextlib.asynccontextmanager
async def _running(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """`work` as a task for as long as the context lasts; cancelled, and its end awaited, at
    the end."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def _backend_specs(config: Config, file_specs: list[BackendSpec] | None) -> AsyncIterator[list[BackendSpec]]:
    """EXECUTORS_FILE's backends, or with TEST_MODE=1 one demo backend of each executor type
    served on a free loopback port for as long as the context lasts."""
    if file_specs is not None:
        yield file_specs
        return
    runners = []
    specs = []
    for exec_type, make_app in (
        (ExecutorType.AUTOMATIC1111, automatic1111_app),
        (ExecutorType.KANDINSKY, kandinsky_app),
    ):
        state = DemoBackendState(
            delay_s=config.demo_delay_s, api_token=config.kandinsky_api_token, keep_received=DEMO_CALLS_KEPT
        )
        runner, endpoint = await serve_on_loopback(make_app(state))
        runners.append(runner)
        # Seeded so a typical job is expected to take DEMO_DELAY_S, as it will.
        speed = DEMO_TYPICAL_JOB_S / config.demo_delay_s if config.demo_delay_s else None
        specs.append(
            BackendSpec(
                name=f"demo-{exec_type.value}",
                exec_type=exec_type,
                endpoint=endpoint,
                gpu="demo",
                model="demo",
                speed=speed,
            )
        )
    log.warning(
        "TEST_MODE=1: using demo backends (%s) instead of %s",
        ", ".join(f"{s.name} at {s.endpoint}" for s in specs),
        config.executors_file,
    )
    try:
        yield specs
    finally:
        for runner in runners:
            await runner.cleanup()


def reload_on_hangup(config: Config, scheduler: Scheduler) -> None:
    """SIGHUP re-reads EXECUTORS_FILE; a bad file is logged and the running pool kept."""
    if config.test_mode:
        return

    def reload() -> None:
        try:
            specs = load_executors(config.executors_file)
        except ConfigError as exc:
            log.error("SIGHUP: kept the current backends: %s", exc)
            return
        log.info("SIGHUP: reloading %s (%d backends)", config.executors_file, len(specs))
        scheduler.fleet.reload(specs)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


def stop_reloading_on_hangup() -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="devoid",
        description=f"{SERVER_NAME}: a durable websocket balancer for image-generation "
        "backends. Settings come from the environment and .env (see README, Settings); TEST_MODE=1 "
        "runs it with demo backends.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "check"],
        default="serve",
        help="serve (the default): run the server; check: validate the settings and the executors "
        "file, probe every backend and mirror once, print one line per item and exit non-zero if "
        "anything is wrong (nothing is started or changed)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """The `devoid` command (and `python -m app`)."""
    args = parse_args(argv)
    # .env of the working directory; the real environment wins over it (override=False).
    load_dotenv(find_dotenv(usecwd=True), override=False)
    if args.command == "check":
        sys.exit(checkup.run(os.environ))
    try:
        config = Config.from_env(os.environ)
        configure_logging(config.logging_level)
        warn_about_settings(config, os.environ)
        # One server per database, checked before anything reads the queue; then the folders
        # and the port, bound before the scheduler starts (a port in use must not cost a
        # dispatched job).
        lock = DatabaseLock.acquire(config.database_path)
        for setting, folder in _data_folders(config):
            check_writable_folder(setting, folder)
        app = create_app(config)
        sock = bind(config.api_host, config.api_port)
    except (ConfigError, CannotStart, ImageSecretUnusable) as exc:
        print(f"devoid: cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_CANNOT_START)
    pace_cycle_collector()
    try:
        asyncio.run(serve(app, sock, config))
    finally:
        lock.release()


def warn_about_settings(config: Config, environ: Mapping[str, str]) -> None:
    """Start-up warnings for settings that are probably not what the operator meant."""
    for name, guess in unknown_settings(environ):
        log.warning(
            "%s (environment or .env) is not a setting of this server and is ignored%s",
            name,
            f"; did you mean {guess}?" if guess else "",
        )
    if config.test_mode and environ.get("SERVICES", "").strip():
        log.warning("TEST_MODE=1 with SERVICES set: the demo key (test:demo-key) is not added; use a SERVICES key")


def _data_folders(config: Config) -> list[tuple[str, Path]]:
    # The database's folder, and the one beside it that holds large payloads.
    folders = [
        ("DATABASE_PATH", config.database_path.parent),
        ("DATABASE_PATH", PayloadFiles.beside(config.database_path).folder),
    ]
    if config.save_images_locally:
        folders.append(("IMAGES_PATH", config.images_path))
    if config.s3_enabled:
        folders.append(("SPOOL_PATH", config.spool_path))
    return folders


async def serve(app: web.Application, sock: socket.socket, config: Config) -> None:
    """Start the app, serve on `sock` until SIGINT/SIGTERM, then shut down in order: refuse new
    requests and answer `queued` for every one already being committed, close the sockets,
    give running jobs SHUTDOWN_GRACE_S, close the store."""
    stopping = asyncio.Event()

    def stop(signal_name: str) -> None:
        log.warning(
            "%s received: shutting down (running jobs get up to %g s; a second signal exits at once)",
            signal_name,
            config.shutdown_grace_s,
        )
        stopping.set()

    on_stop_signals(stop)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.shutdown_grace_s + 5,
        access_log_class=QuietPollingAccessLogger,
    )
    await runner.setup()  # store, mirrors, backends, scheduler (cleanup_ctx)
    try:
        await web.SockSite(runner, sock, shutdown_timeout=config.shutdown_grace_s + 5).start()
        log.info(
            "listening on http://%s:%d (services: %s)",
            config.api_host,
            config.api_port,
            ", ".join(sorted(config.services)),
        )
        await stopping.wait()
        log.info("shutdown: refusing new requests; answering those already being committed")
        await app[keys.HUB].finish_accepts()
    finally:
        await runner.cleanup()  # closes connections, then the scheduler, mirrors and store
    log.info("stopped")
