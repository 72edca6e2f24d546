"""`devoid check`: read the settings and the executors file, probe every backend and mirror
once, and print one line per item, without starting the server or changing anything (the
database is opened read-only, no migration is applied, no port is kept).

Exit status 0 when nothing is wrong (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from app.backends.base import BackendSpec
from app.config import Config, ConfigError, unknown_settings
from app.executors import build_backend, load_executors
from app.moderation import Moderator
from app.process import CannotStart, bind
from app.storage.migrations import migration_files
from app.storage.payload_files import PayloadFiles

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Finding:
    status: str  # OK, WARN or FAIL
    item: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.item:<24} {self.detail}"


async def check(environ: Mapping[str, str]) -> list[Finding]:
    findings = [
        Finding(WARN, f"setting {name}", f"is not a setting of this server and is ignored{_meant(guess)}")
        for name, guess in unknown_settings(environ)
    ]
    try:
        config = Config.from_env(environ)
    except ConfigError as exc:
        return [*findings, Finding(FAIL, "settings", str(exc))]
    findings.append(Finding(OK, "settings", f"services: {', '.join(sorted(config.services))}"))
    specs, finding = _executors(config)
    findings.append(finding)
    findings += _files(config)
    findings.append(await asyncio.to_thread(_database, config.database_path))
    findings.append(_port(config))
    findings += await _backends(config, specs)
    findings += await _mirrors(config)
    return findings


def _meant(guess: str | None) -> str:
    return f" (did you mean {guess}?)" if guess else ""


def _executors(config: Config) -> tuple[list[BackendSpec], Finding]:
    """The backends to probe (none in TEST_MODE or when the file is bad), and the file's line."""
    if config.test_mode:
        return [], Finding(WARN, "backends", "TEST_MODE=1: demo backends instead of EXECUTORS_FILE")
    try:
        specs = load_executors(config.executors_file)
    except ConfigError as exc:
        return [], Finding(FAIL, "executors file", str(exc))
    return specs, Finding(OK if specs else WARN, "executors file", f"{config.executors_file}: {len(specs)} backends")


def _files(config: Config) -> list[Finding]:
    findings = []
    try:
        rules = Moderator.load(config.moderation_rules_file)
        findings.append(Finding(OK, "moderation rules", f"{len(rules.rules)} rules"))
    except ConfigError as exc:
        findings.append(Finding(FAIL, "moderation rules", str(exc)))
    folders = [
        ("DATABASE_PATH", config.database_path.parent),
        ("DATABASE_PATH.payloads", PayloadFiles.beside(config.database_path).folder),
        ("IMAGES_PATH", config.images_path),
    ]
    findings += [_folder(setting, folder) for setting, folder in folders]
    return findings


def _folder(setting: str, folder: Path) -> Finding:
    """Whether the server could write in `folder`, without creating it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Finding(
            FAIL, f"folder {setting}", f"{setting}={folder} is not usable: {existing} is not a writable folder"
        )
    if existing == folder:
        return Finding(OK, f"folder {setting}", f"{folder} is writable")
    return Finding(OK, f"folder {setting}", f"{folder} is created at start-up (in {existing}, writable)")


def _database(path: Path) -> Finding:
    if not path.exists():
        return Finding(OK, "database", f"{path} does not exist yet; it is created at start-up")
    latest = max(version for version, _ in migration_files())
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            version = db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
            counts = dict(db.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())
    except sqlite3.Error as exc:
        return Finding(FAIL, "database", f"{path} cannot be read: {exc}")
    if version > latest:
        return Finding(FAIL, "database", f"{path} is at schema {version}, newer than this release's {latest}")
    waiting = f"{counts.get('queued', 0)} queued, {counts.get('generating', 0)} generating"
    upgrade = f"; start-up applies migrations {version + 1}-{latest}" if version < latest else ""
    return Finding(OK, "database", f"{path}: schema {version}, {waiting}{upgrade}")


def _port(config: Config) -> Finding:
    try:
        bind(config.api_host, config.api_port).close()
        return Finding(OK, "listen address", f"{config.api_host}:{config.api_port} is free")
    except CannotStart as exc:
        return Finding(WARN, "listen address", f"{exc} (a running server holds it?)")


async def _backends(config: Config, specs: list[BackendSpec]) -> list[Finding]:
    async with aiohttp.ClientSession() as session:
        backends = [build_backend(spec, session, config.kandinsky_api_token) for spec in specs]
        answers = await asyncio.gather(*[backend.probe(config.probe_timeout_s) for backend in backends])
    return [
        Finding(
            WARN if spec.disabled and problem else FAIL if problem else OK,
            f"backend {spec.name}",
            f"{spec.exec_type.value} at {spec.endpoint}: {problem or 'answers'}{' (disabled)' if spec.disabled else ''}",
        )
        for spec, problem in zip(specs, answers, strict=True)
    ]


async def _mirrors(config: Config) -> list[Finding]:
    findings = []
    if config.mongodb_enabled:
        from app.mirrors import mongodb

        client = mongodb.open_client(config)
        try:
            await client[config.mongodb_db].command("ping")
            findings.append(Finding(OK, "mirror mongodb", f"database {config.mongodb_db} answers"))
        except Exception as exc:
            findings.append(Finding(FAIL, "mirror mongodb", f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            await client.close()
    if config.s3_enabled:
        from app.mirrors import s3

        async with s3.open_client(config) as client:
            try:
                await client.head_bucket(Bucket=config.s3_bucket_name)
                findings.append(Finding(OK, "mirror s3", f"bucket {config.s3_bucket_name} at {config.s3_endpoint}"))
            except Exception as exc:
                findings.append(Finding(FAIL, "mirror s3", f"bucket {config.s3_bucket_name}: {exc}"[:300]))
    return findings


def run(environ: Mapping[str, str]) -> int:
    """Print the findings; the exit status."""
    findings = asyncio.run(check(environ))
    for finding in findings:
        print(finding.line())
    failed = sum(finding.status == FAIL for finding in findings)
    print(f"{len(findings)} checked, {failed} wrong" if failed else f"{len(findings)} checked, nothing wrong")
    sys.stdout.flush()
    return 1 if failed else 0
