"""Making a file's name durable, not only its bytes.

fsync on a file puts its contents on disk; the entry that names it lives in its folder, which
a power loss can roll back on its own. Whatever is committed to point at a file (a request row
at its payload, a result at its image) waits for its folder's fsync too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Put `folder`'s entries (files created, renamed or deleted in it) on disk."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
