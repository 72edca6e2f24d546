"""Applies the numbered SQL files in migrations/ that a database has not seen yet."""

from __future__ import annotations

import logging
import re
import time
from importlib import resources
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)

# The `migrations` package beside `app` (installed with it as package data).
MIGRATIONS_DIR = Path(str(resources.files("migrations")))
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """(version, path) of every migration file, in order."""
    found = []
    for path in directory.iterdir():
        match = _FILE_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


async def apply_migrations(db: aiosqlite.Connection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply pending migrations, each in its own transaction. Returns the versions applied.

    Safe to call on every start: applied versions are recorded and skipped.
    """
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    async with db.execute("SELECT version FROM schema_migrations") as cursor:
        done = {row[0] async for row in cursor}
    applied = []
    for version, path in migration_files(directory):
        if version in done:
            continue
        script = path.read_text(encoding="utf-8")
        # One script, one transaction: a failing migration leaves no half-built schema.
        try:
            await db.executescript(
                f"BEGIN;\n{script}\n"
                f"INSERT INTO schema_migrations (version, name, applied_at) "
                f"VALUES ({version}, '{path.name}', {time.time()});\nCOMMIT;"
            )
        except Exception:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            log.error("migration %s failed; the database is left as it was before it", path.name)
            raise
        log.info("applied migration %s", path.name)
        applied.append(version)
    return applied
