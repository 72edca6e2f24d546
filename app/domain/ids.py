"""Request ids in MongoDB's ObjectId layout, as 24 hex digits: 4 bytes of unix time, 5 random
bytes drawn once per process, a 3-byte counter from a random start. So a request's id is also
its record's `_id` in MongoDB, ids sort by creation time, and two processes (or a restart)
never make the same one. Nothing relies on them being secret.

Made here rather than by bson.ObjectId, which asks the kernel for the process id on every call
(9 % of the event loop's time at intake, measured with 50 connections of small requests)."""

from __future__ import annotations

import itertools
import os
import time

_PROCESS_PART = os.urandom(5).hex()
_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))
_COUNTER_MASK = 0xFFFFFF


def new_object_id() -> str:
    """A fresh 24-hex id, unique across processes and restarts."""
    return f"{int(time.time()) & 0xFFFFFFFF:08x}{_PROCESS_PART}{next(_COUNTER) & _COUNTER_MASK:06x}"
