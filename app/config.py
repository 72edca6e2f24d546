"""Every setting of the server, declared once: name, default, unit and one line of help.

`Config.from_env(environ)` is the only place settings are read. A bad value raises
`ConfigError` with one sentence naming the setting; `main()` prints it and exits.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import setting_values as value
from app.log_output import LoopPassHandler, SecondCachedFormatter
from app.storage.group_commit import MAX_BATCH_ROWS


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Setting:
    env_name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


# The single declaration of every setting. README.md and .env.example document each one
# (tests/test_config.py fails when one is missing there).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "TEST_MODE", "0", value.flag, "1: run built-in demo backends for both executor types instead of EXECUTORS_FILE"
    ),
    Setting("LOGGING_LEVEL", "INFO", value.logging_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    Setting("API_HOST", "127.0.0.1", value.text, "address to listen on; the default accepts local connections only"),
    Setting("API_PORT", "8080", value.port, "port to listen on"),
    Setting(
        "PUBLIC_URL",
        "",
        value.url,
        "URL clients reach this server at, used in image_url results; empty = http://API_HOST:API_PORT",
    ),
    Setting(
        "SERVICES",
        "",
        value.services,
        "space-separated name:key pairs; empty with TEST_MODE=1 means test:demo-key",
        secret=True,
    ),
    Setting(
        "DATABASE_PATH", "data/devoid.sqlite3", value.text, "SQLite file that holds every request (the source of truth)"
    ),
    Setting(
        "STORE_BATCH_ROWS",
        str(MAX_BATCH_ROWS),
        value.positive_int,
        "most writes committed in one SQLite transaction (group commit); 1 turns grouping off",
    ),
    Setting(
        "EXECUTORS_FILE",
        "data/executors.json",
        value.text,
        "JSON list of backends: name, gpu, timeout (s), model, exec_type, endpoint",
    ),
    Setting(
        "GENERAL_PREMIUM_RATIO",
        "1 3",
        value.ratio,
        "'a b': of every a+b dispatches while both wait, a general and b premium",
    ),
    Setting(
        "MAX_ATTEMPTS",
        "3",
        value.positive_int,
        "backend attempts a request gets (each on another healthy backend when one exists)",
    ),
    Setting(
        "RETRY_BACKOFF_S",
        "2.0",
        value.non_negative_float,
        "seconds before the first retry of a failed job; doubles each attempt, with jitter",
    ),
    Setting(
        "BREAKER_FAILURES",
        "3",
        value.positive_int,
        "failed jobs in a row that take a backend out of service until its probe answers",
    ),
    Setting(
        "HEALTH_INTERVAL_S", "10", value.positive_float, "seconds between health probes of an idle healthy backend"
    ),
    Setting("PROBE_TIMEOUT_S", "3", value.positive_float, "seconds a health probe may take"),
    Setting(
        "PROBE_BACKOFF_MAX_S",
        "60",
        value.positive_float,
        "longest wait between probes of a backend that is down (the wait doubles from 1 s)",
    ),
    Setting(
        "JOB_TIMEOUT_FLOOR_S",
        "30",
        value.positive_float,
        "least time a job gets before its backend call is abandoned (an executor's "
        "`timeout` raises it for that backend)",
    ),
    Setting(
        "JOB_TIMEOUT_FACTOR",
        "4",
        value.positive_float,
        "a job's timeout is this many times its expected duration, between floor and cap",
    ),
    Setting("JOB_TIMEOUT_CAP_S", "1800", value.positive_float, "most time any job gets"),
    Setting(
        "MAX_QUEUE_WAIT_S",
        "3600",
        value.positive_float,
        "a request still waiting for a backend after this long is ended with an error",
    ),
    Setting(
        "PROGRESS_INTERVAL_S",
        "1.0",
        value.non_negative_float,
        "seconds between AUTOMATIC1111 progress polls sent as info messages; 0 = off",
    ),
    Setting(
        "KANDINSKY_API_TOKEN", "", value.text, "sent as the authorization header to Kandinsky backends", secret=True
    ),
    Setting(
        "SAVE_IMAGES_LOCALLY",
        "1",
        value.flag,
        "1: write each image under IMAGES_PATH and answer with an image_url served at "
        "/img/{file_name}; 0: answer with base64",
    ),
    Setting("IMAGES_PATH", "data/images", value.text, "folder for local images"),
    Setting(
        "IMAGE_URL_SECRET",
        "",
        value.text,
        "signs image URLs (/img/{file_name}?key=...): an image is served only with its key; empty = a "
        "random secret made once and kept beside the database (DATABASE_PATH.image-url-secret)",
        secret=True,
    ),
    Setting(
        "RETENTION_S",
        "604800",
        value.non_negative_float,
        "seconds a finished request keeps its payload, result and local image (default 7 days); "
        "then only a summary row stays; 0 = keep everything forever",
    ),
    Setting(
        "SUMMARY_RETENTION_S",
        "7776000",
        value.non_negative_float,
        "seconds after it finished that a request's summary row is deleted too (default 90 days, at "
        "least RETENTION_S); 0 = keep summaries forever",
    ),
    Setting(
        "STATUS_PAGE",
        "1",
        value.flag,
        "1: a browser opening / gets a live status page (queues, backends, recent requests), "
        "also as /status.json; without STATUS_PAGE_KEY it shows counts and states only; 0: off",
    ),
    Setting(
        "STATUS_PAGE_KEY",
        "",
        value.text,
        "opens the status page's detailed view (request ids, services, thumbnails, error texts): "
        "open /#key=<key>, or send it as the authorization header of /status.json; empty = only "
        "the public view (counts and states)",
        secret=True,
    ),
    Setting(
        "MAX_MESSAGE_BYTES",
        "16777216",
        value.positive_int,
        "largest websocket message accepted, in bytes (img2img images are large)",
    ),
    Setting(
        "SEND_TIMEOUT_S",
        "30",
        value.positive_float,
        "seconds one message to a client may wait for the client to read; a connection that "
        "stops reading longer is closed, and its answers wait in SQLite for a reconnect",
    ),
    Setting(
        "MAX_USER_REQUESTS",
        "20",
        value.per_service("20"),
        "requests one user (service_info.user_id) may have queued or running; a number for every "
        "service and/or name:number pairs; 0 = no cap (code user_queue_full)",
    ),
    Setting(
        "MAX_SERVICE_REQUESTS",
        "5000",
        value.per_service("5000"),
        "requests one service may have queued or running; number and/or name:number; 0 = no cap "
        "(code service_queue_full)",
    ),
    Setting(
        "SERVICE_RATE_PER_S",
        "50",
        value.per_service("50"),
        "requests per second a service may send, on average (token bucket); number and/or "
        "name:number; 0 = no limit (code rate_limited)",
    ),
    Setting(
        "SERVICE_BURST",
        "500",
        value.per_service("500"),
        "requests a service may send at once before SERVICE_RATE_PER_S applies (the bucket's size)",
    ),
    Setting(
        "PREMIUM_SERVICES",
        "*",
        value.service_names,
        "services whose premium flag is honoured: * = all, or space-separated names; a premium "
        "request from another service is refused (code premium_not_allowed)",
    ),
    Setting(
        "MAX_JOB_UNITS",
        "800000000",
        value.per_service("800000000"),
        "largest job in cost units (steps x width x height x images; the default is about 10 minutes "
        "of a reference GPU, e.g. 1024x1024, 50 steps, 15 images); number and/or name:number; 0 = "
        "no ceiling (code job_too_large)",
    ),
    Setting(
        "MODERATION_RULES_FILE",
        "",
        value.text,
        "JSON rules that requests with settings.moderate=1 are checked against (docs/operations.md); "
        "empty = the built-in rules (code moderated)",
    ),
    Setting(
        "IMAGE_CHECK_URL",
        "",
        value.url,
        "classifier the finished image of a request with settings.moderate=1 is POSTed to before "
        "delivery (docs/operations.md, Image check); empty = off",
    ),
    Setting("IMAGE_CHECK_TIMEOUT_S", "10", value.positive_float, "seconds one call to IMAGE_CHECK_URL may take"),
    Setting("DEMO_DELAY_S", "2.0", value.non_negative_float, "seconds a TEST_MODE demo backend takes per image"),
    Setting(
        "SHUTDOWN_GRACE_S",
        "10",
        value.non_negative_float,
        "seconds running jobs get to finish on shutdown before they are re-queued",
    ),
    Setting("MONGODB_URI", "", value.text, "MongoDB mirror of request records; empty = off", secret=True),
    Setting("MONGODB_DB", "", value.text, "MongoDB database name for the mirror"),
    Setting(
        "MONGODB_TIMEOUT_S",
        "5",
        value.positive_float,
        "seconds a MongoDB write may wait for the server before it is retried later",
    ),
    Setting("S3_ENDPOINT", "", value.url, "S3 server for images; empty = off"),
    Setting("S3_ACCESS_KEY", "", value.text, "S3 access key", secret=True),
    Setting("S3_SECRET_KEY", "", value.text, "S3 secret key", secret=True),
    Setting("S3_BUCKET_NAME", "", value.text, "S3 bucket for images"),
    Setting("S3_REGION", "us-east-1", value.text, "S3 region name"),
    Setting(
        "S3_IMAGE_ENDPOINT",
        "",
        value.text,
        "public URL prefix of uploaded images: image_url = S3_IMAGE_ENDPOINT + file_name",
    ),
    Setting(
        "S3_SYNC_TIMEOUT_S",
        "30",
        value.positive_float,
        "with sync_with_s3=1, how long the ok waits for the upload before it is sent with a "
        "local (or base64) result instead; the upload carries on",
    ),
    Setting(
        "SPOOL_PATH",
        "data/spool",
        value.text,
        "folder for images waiting for their S3 upload when SAVE_IMAGES_LOCALLY=0",
    ),
    Setting(
        "MIRROR_RETRY_MAX_S",
        "30",
        value.positive_float,
        "longest wait between retries of a mirror that is down (the wait doubles from 0.5 s)",
    ),
)

DEMO_SERVICES = {"test": "demo-key"}


@dataclass(frozen=True)
class Config:
    test_mode: bool
    logging_level: str
    api_host: str
    api_port: int
    public_url: str
    services: dict[str, str] = dataclasses.field(repr=False)
    database_path: Path
    store_batch_rows: int
    executors_file: Path
    general_premium_ratio: tuple[int, int]
    max_attempts: int
    retry_backoff_s: float
    breaker_failures: int
    health_interval_s: float
    probe_timeout_s: float
    probe_backoff_max_s: float
    job_timeout_floor_s: float
    job_timeout_factor: float
    job_timeout_cap_s: float
    max_queue_wait_s: float
    progress_interval_s: float
    kandinsky_api_token: str = dataclasses.field(repr=False)
    save_images_locally: bool
    images_path: Path
    image_url_secret: str = dataclasses.field(repr=False)
    retention_s: float
    summary_retention_s: float
    status_page: bool
    status_page_key: str = dataclasses.field(repr=False)
    max_message_bytes: int
    send_timeout_s: float
    max_user_requests: value.PerService
    max_service_requests: value.PerService
    service_rate_per_s: value.PerService
    service_burst: value.PerService
    premium_services: frozenset[str] | None
    max_job_units: value.PerService
    moderation_rules_file: str
    image_check_url: str
    image_check_timeout_s: float
    demo_delay_s: float
    shutdown_grace_s: float
    mongodb_uri: str = dataclasses.field(repr=False)
    mongodb_db: str
    mongodb_timeout_s: float
    s3_endpoint: str
    s3_access_key: str = dataclasses.field(repr=False)
    s3_secret_key: str = dataclasses.field(repr=False)
    s3_bucket_name: str
    s3_region: str
    s3_image_endpoint: str
    s3_sync_timeout_s: float
    spool_path: Path
    mirror_retry_max_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build the config from a mapping of environment variables.

        Raises ConfigError naming the first bad setting.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env_name, setting.default)
            try:
                values[setting.env_name.lower()] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{setting.env_name}: {exc}") from None
        for path_name in ("database_path", "executors_file", "images_path", "spool_path"):
            if not values[path_name]:
                raise ConfigError(f"{path_name.upper()}: must not be empty")
            values[path_name] = Path(values[path_name])
        if not values["services"]:
            if not values["test_mode"]:
                raise ConfigError("SERVICES: no services configured (expected space-separated name:key pairs)")
            values["services"] = dict(DEMO_SERVICES)
        _check_services_named(values)
        _check_all_or_none(values, ("mongodb_uri", "mongodb_db"))
        _check_all_or_none(
            values, ("s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket_name", "s3_image_endpoint")
        )
        if not values["public_url"]:
            values["public_url"] = f"http://{values['api_host']}:{values['api_port']}"
        return cls(**values)

    def with_changes(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def image_url_prefix(self) -> str:
        return f"{self.public_url}/img/"

    @property
    def mongodb_enabled(self) -> bool:
        return bool(self.mongodb_uri)

    @property
    def s3_enabled(self) -> bool:
        return bool(self.s3_endpoint)


def unknown_settings(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """Of `names` (environment variables, .env keys), those that look like one of ours but are
    not: the same first word as a setting (`API_PROT`), or a close spelling of one
    (`LOGING_LEVEL`). Each with the setting it most likely means, or None."""
    known = {setting.env_name for setting in SETTINGS}
    prefixes = {name.split("_", 1)[0] + "_" for name in known}
    found = []
    for name in sorted(set(names) - known):
        closest = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if closest or name.startswith(tuple(prefixes)):
            found.append((name, closest[0] if closest else None))
    return found


def _check_services_named(values: dict[str, Any]) -> None:
    """A limit for a service that does not exist is a typo that would leave the real one unlimited."""
    known = values["services"]
    for setting in (
        "max_user_requests",
        "max_service_requests",
        "service_rate_per_s",
        "service_burst",
        "max_job_units",
    ):
        for name in values[setting].named:
            if name not in known:
                raise ConfigError(f"{setting.upper()}: no service is named {name!r} (SERVICES has {', '.join(known)})")
    for name in values["premium_services"] or ():
        if name not in known:
            raise ConfigError(f"PREMIUM_SERVICES: no service is named {name!r} (SERVICES has {', '.join(known)})")


def _check_all_or_none(values: dict[str, Any], names: tuple[str, ...]) -> None:
    """A mirror is on when all its settings are set, off when none are; half is a mistake."""
    missing = [name.upper() for name in names if not values[name]]
    if missing and len(missing) < len(names):
        raise ConfigError(
            f"{missing[0]}: must be set when {names[0].upper()} is "
            f"(set all of {', '.join(n.upper() for n in names)}, or none)"
        )


# Libraries whose DEBUG output carries request data: aiosqlite logs every statement with its
# parameters (payloads, base64 images), botocore logs signed headers, pymongo whole commands.
# They never log below INFO here, whatever LOGGING_LEVEL says.
QUIET_LIBRARIES = ("aiosqlite", "botocore", "aiobotocore", "boto3", "s3transfer", "pymongo", "urllib3")


def configure_logging(level: str) -> None:
    # The log format names no thread, process or source line: not collecting them makes each
    # record ~3 us cheaper (the logging HOWTO's "Optimization"; _srcfile = None skips the
    # caller lookup). A few records per request are logged at INFO.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = LoopPassHandler(sys.stderr)  # lines written once per pass of the event loop
    handler.setFormatter(SecondCachedFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))


if __name__ == "__main__":
    # `python -m app.config [--check | --write]`: the settings docs (app/settings_docs.py).
    from app.settings_docs import main

    sys.exit(main(sys.argv[1:]))
