"""The server's log lines reach standard error whole and in order, written once per pass of
the event loop: the lines logged in one pass come out together when it ends, a line logged
outside the loop comes out at once, and nothing waiting is lost at shutdown."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from app.log_output import FORMAT, LoopPassHandler, SecondCachedFormatter


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "server.log"
    with open(path, "w") as stream:
        handler = LoopPassHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("test_log_output")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield path, logger, handler
        finally:
            logger.removeHandler(handler)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_lines_of_one_loop_pass_are_written_together_when_it_ends(log_file):
    path, logger, _ = log_file
    for n in range(5):
        logger.info("request %d queued", n)
    assert lines(path) == []  # still this pass of the loop
    await asyncio.sleep(0)
    assert lines(path) == [f"request {n} queued" for n in range(5)]
    logger.info("request 5 queued")
    await asyncio.sleep(0)
    assert lines(path)[-1] == "request 5 queued"


async def test_a_line_from_a_worker_thread_keeps_its_place(log_file):
    path, logger, _ = log_file
    await asyncio.to_thread(logger.info, "from a thread, nothing waiting")
    assert lines(path) == ["from a thread, nothing waiting"]  # written at once
    logger.info("on the loop")
    await asyncio.to_thread(logger.info, "from a thread, after it")
    await asyncio.sleep(0)
    assert lines(path)[1:] == ["on the loop", "from a thread, after it"]


def test_outside_an_event_loop_a_line_is_written_at_once(log_file):
    path, logger, _ = log_file
    logger.info("starting")
    assert lines(path) == ["starting"]


async def test_flushing_writes_what_waits(log_file):
    path, logger, handler = log_file
    logger.info("the last line before exit")
    handler.flush()  # logging.shutdown does this at exit
    assert lines(path) == ["the last line before exit"]


def test_the_time_reads_as_python_logging_writes_it():
    standard = logging.Formatter(FORMAT)
    cached = SecondCachedFormatter()
    for created in (1_764_607_477.0, 1_764_607_477.999, 1_764_607_478.0005, 1_764_607_478.5, 1_700_000_000.25):
        record = logging.LogRecord("app.web.intake", logging.INFO, "", 0, "%s queued", ("6b01",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == standard.format(record)
