"""Where a server process spends its CPU: its CPU time from /proc, and a sampling profile
(py-spy) summed two ways: self time per function
(where the CPU is spent) and inclusive time per function (which call paths cost the most)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY_MISSING = "py-spy is not installed (pip install -r bench/requirements.txt)"


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) of a process, or of one of its threads (the main thread, which
    runs the event loop, has the process's id)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Sampler:
    """py-spy recording `pid` into `profile_to` until stopped; nothing when py-spy is missing.
    With `gil`, only the thread holding the GIL is sampled: where a process bound by the GIL
    spends it (threads waiting in C calls otherwise show as busy)."""

    def __init__(self, pid: int, profile_to: Path, *, gil: bool = False) -> None:
        self.profile_to = profile_to
        self.process: subprocess.Popen | None = None
        if shutil.which("py-spy") is not None:
            self.process = subprocess.Popen(
                ["py-spy", "record", "--format", "raw", "--rate", "250", "-o", str(profile_to), "--pid", str(pid)]
                + (["--gil"] if gil else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(2)
            self.process.wait()


@contextlib.asynccontextmanager
async def sampled(pid: int, profile_to: Path | None, *, gil: bool = False) -> AsyncIterator[None]:
    """A Sampler on `pid` for as long as the context lasts (nothing without `profile_to`),
    given a second to attach before what is measured starts."""
    if profile_to is None:
        yield
        return
    spy = Sampler(pid, profile_to, gil=gil)
    try:
        await asyncio.sleep(1.0)
        yield
    finally:
        spy.stop()


EVENT_LOOP = "BaseEventLoop.run_forever"


def _function(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: a function's samples summed over its lines."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _stacks(profile: Path, within: str) -> list[tuple[list[str], int]]:
    """The samples whose stack names `within` (all when empty), as function frames."""
    stacks = []
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if within and not any(within in frame for frame in frames):
            continue
        stacks.append(([_function(frame) for frame in frames], int(count)))
    return stacks


def hottest(profile: Path, top: int = 12, within: str = "") -> list[str]:
    """Self time per function (the leaf frame of each sample)."""
    samples: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in _stacks(profile, within):
        samples[frames[-1]] += count
        total += count
    return [f"{count / max(total, 1):6.1%}  {leaf}" for leaf, count in samples.most_common(top)]


def heaviest_paths(profile: Path, top: int = 25, within: str = EVENT_LOOP) -> list[str]:
    """Inclusive time per function (counted once per sample however deep it recurs), leaving out
    the frames every sample shares (the loop itself)."""
    samples: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in _stacks(profile, within):
        total += count
        for frame in set(frames):
            samples[frame] += count
    return [f"{count / total:6.1%}  {frame}" for frame, count in samples.most_common() if count < total * 0.99][:top]


# Where a sample's leaf frame is, by the file it is in: which layer of the stack did the work.
# A call into C (a system call, the sqlite3 or JSON extension) counts for the Python line
# that made it.
LAYERS = (
    ("the event loop itself (asyncio, selectors: system calls, callbacks, tasks)", ("asyncio/", "selectors.py")),
    ("aiohttp (HTTP, websocket frames)", ("aiohttp/", "multidict/", "yarl/")),
    ("SQLite (sqlite3, aiosqlite)", ("aiosqlite/", "sqlite3/")),
    ("JSON (json)", ("json/",)),
    ("logging", ("logging/",)),
    ("the server's own code", ("app/", "peer_server.py")),
)


def by_layer(profile: Path, within: str = EVENT_LOOP) -> list[str]:
    """Self time per layer of the stack (LAYERS), the rest as `other`."""
    samples: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in _stacks(profile, within):
        where = frames[-1].rpartition(" (")[2]
        layer = next((name for name, paths in LAYERS if any(path in where for path in paths)), "other")
        samples[layer] += count
        total += count
    return [f"{count / max(total, 1):6.1%}  {layer}" for layer, count in samples.most_common()]


def print_loop_profile(profile: Path, what: str) -> None:
    """The event loop's hot spots in a recorded profile: self time by layer, by function, then
    inclusive time."""
    print(f"\n{what}, event loop's self time by layer (py-spy):")
    for line in by_layer(profile):
        print("  " + line)
    print(f"\n{what}, event loop's self time by function (py-spy):")
    for line in hottest(profile, within=EVENT_LOOP):
        print("  " + line)
    print(f"\n{what}, event loop's inclusive time by function (py-spy):")
    for line in heaviest_paths(profile):
        print("  " + line)
