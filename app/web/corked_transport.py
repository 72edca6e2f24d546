"""One socket write per connection per pass of the event loop, however many frames it sends.

A group commit wakes tens of accepts at once, and each sends its `queued`; a finished job sends
`generating`, `ok` and `info` messages close together. Each frame was its own socket write, and
a send() system call costs more than everything else a small frame needs (in this VM, 15 % of
the event loop's time during intake went to them). A websocket's frames are written through
CorkedTransport instead: it keeps what aiohttp's frame writer gives it until the loop has run
everything ready now, then writes it in one call. Frames stay whole and in order; a frame waits
at most for the rest of the current pass of the loop.

Some writes go out at once, after whatever waits before them:
- a close frame (and so everything before it): aiohttp may close the socket right after it;
- anything of FLUSH_AT_BYTES or more: joining it with small frames would only copy it (unless
  the writes are `held`, below).

`sends_at_once()` opens a block in which no frame sent on the connection waits for the client,
or says it cannot: aiohttp's frame writer waits only while the connection's protocol has
writing paused, and only the real transport's buffer passing its high-water mark pauses it.
So when writing is not paused as the block opens, and every write inside it is only gathered
here (held, whatever its size), every send inside it returns without letting another task run.
Intake relies on that to put a burst's requests in line before their `queued` answers are
sent (app/web/intake.py, Intake._answer_settled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

# Writes this large go out at once (after what waits): copying them into a joined buffer costs
# more than the system call saved.
FLUSH_AT_BYTES = 16 * 1024
_CLOSE_OPCODE = 0x8


class CorkedTransport:
    """A websocket connection's transport as its frame writer sees it: writes gathered, and
    handed to the real transport in one write at the end of the loop's current pass."""

    def __init__(self, transport: asyncio.Transport, writing_paused: Callable[[], bool]) -> None:
        self._transport = transport
        self._writing_paused = writing_paused
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._held = False

    @classmethod
    def install(cls, ws: web.WebSocketResponse, transport: asyncio.Transport) -> CorkedTransport:
        """Put a CorkedTransport between a prepared websocket's frame writer and `transport`."""
        writer = ws._writer  # aiohttp keeps no public hook for this (pinned in requirements.txt)
        assert writer is not None, "install after ws.prepare()"
        protocol = writer.protocol
        corked = cls(transport, lambda: protocol.writing_paused)
        writer.transport = corked  # type: ignore[assignment]
        return corked

    @contextmanager
    def sends_at_once(self) -> Iterator[bool]:
        """A block in which no send on this connection waits (True), or False when one could:
        writing is paused (the client is not reading fast enough) or the connection closes."""
        if self._held or self._writing_paused() or self._transport.is_closing():
            yield False
            return
        self._held = True
        try:
            yield True
        finally:
            self._held = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if (data and data[0] & 0x0F == _CLOSE_OPCODE) or (len(data) >= FLUSH_AT_BYTES and not self._held):
            # A close frame is recognised by its first byte. A large frame's body is written
            # apart from its header and may start with any byte: then it is flushed early,
            # which is always safe.
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)

    def flush(self) -> None:
        """Hand what waits to the real transport now."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if self._transport.is_closing():
            return  # the connection is gone; so are its frames, as they would be in its buffer
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_bytes

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def abort(self) -> None:
        self._pending, self._pending_bytes = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Whatever else aiohttp's writer may ask of a transport.
        return getattr(self._transport, name)
