"""ObjectId-compatible request ids: 24 hex digits, the record's `_id` in MongoDB."""

import itertools
import os
import time

# The ObjectId layout: 4-byte big-endian seconds, 5 random bytes fixed per process,
# 3-byte counter. Ids made in one process sort by creation time.
_PROCESS_RANDOM = os.urandom(5)
_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_object_id() -> str:
    """Return a fresh 24-hex id, unique across processes and restarts."""
    seconds = int(time.time()) & 0xFFFFFFFF
    count = next(_counter) & 0xFFFFFF
    return (seconds.to_bytes(4, "big") + _PROCESS_RANDOM + count.to_bytes(3, "big")).hex()
