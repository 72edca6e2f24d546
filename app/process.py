"""What belongs to the server process rather than to the app: one server per database (a
lock file), the listening socket bound before any job is touched, usable data folders, the
signals that stop it, and the cycle collector's pace.

Order at start (main.py): lock the database, check the folders, bind the port, then start the
app (store, mirrors, scheduler), then serve. Each of the first three fails with one line
naming the setting and exit status 2, before the queue is read: a second server started by
mistake never re-runs the first one's jobs.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

EXIT_CANNOT_START = 2
# Python's cycle collector looks at its youngest objects after every 700 new containers, by
# default: at thousands of requests per second (each a few dozen dicts and lists), hundreds of
# times a second, and each older generation's pass walks the queued jobs too. Almost nothing
# the server makes is cyclic garbage. With these thresholds intake spent 8-12 % less CPU per
# small request (bench.intake, A/B interleaved twice, 1 and 50 connections: 237-257 ->
# 209-226 us), for a few MB of garbage that waits a little longer.
CYCLE_COLLECTOR_THRESHOLDS = (20_000, 20, 20)
# A second SIGINT/SIGTERM during shutdown: exit at once, as a shell does for Ctrl-C.
EXIT_SECOND_SIGNAL = 130


class CannotStart(Exception):
    """The server cannot start; the message is one sentence naming the setting."""


class DatabaseLock:
    """An exclusive lock on `<DATABASE_PATH>.lock`, held for the life of the process (the
    kernel releases it when the process dies, even by SIGKILL). The file holds the pid."""

    def __init__(self, file: IO[str], path: Path) -> None:
        self._file = file
        self.path = path

    @classmethod
    def acquire(cls, database_path: Path) -> DatabaseLock:
        path = database_path.with_name(database_path.name + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(path, "a+")  # noqa: SIM115 - held open: the lock lives as long as the file
        except OSError as exc:
            raise CannotStart(f"DATABASE_PATH={database_path} is not usable: {exc.strerror} ({path.parent})") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise CannotStart(f"another server (pid {holder}) is already using DATABASE_PATH={database_path}") from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        return cls(file, path)

    def release(self) -> None:
        self._file.close()


def check_writable_folder(setting: str, folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CannotStart(f"{setting}={folder} is not usable: {exc.strerror}") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (SO_REUSEADDR, as aiohttp's own sites use)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotStart(f"API_HOST={host} cannot be resolved: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotStart(f"API_PORT={port} on {host} is already in use") from None
        raise CannotStart(f"cannot listen on API_HOST={host} API_PORT={port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def on_stop_signals(stop: Callable[[str], None]) -> None:
    """Call `stop(signal name)` on the first SIGINT or SIGTERM; on a second one, exit at once
    with one line: everything accepted is already in SQLite, so nothing is lost."""
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def handle(name: str) -> None:
        if received:
            for handler in logging.getLogger().handlers:
                handler.flush()  # log lines waiting for the end of this loop pass (log_output.py)
            print(
                f"devoid: {name} again during shutdown: exiting now; queued and running requests "
                "resume at the next start",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_SECOND_SIGNAL)
        received.append(name)
        stop(name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handle, signal.Signals(signum).name)


def pace_cycle_collector() -> None:
    """Run the cycle collector less often than Python's default (CYCLE_COLLECTOR_THRESHOLDS)."""
    gc.set_threshold(*CYCLE_COLLECTOR_THRESHOLDS)
