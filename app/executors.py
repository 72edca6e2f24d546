"""EXECUTORS_FILE: the list of backend instances, in the original product's format."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from app.backends.automatic1111 import Automatic1111Backend
from app.backends.base import Backend, BackendSpec
from app.backends.kandinsky import KandinskyBackend
from app.config import ConfigError
from app.domain.jobs import ExecutorType


class ExecutorEntrySchema(Schema):
    class Meta:
        unknown = EXCLUDE  # the original's files carry extra notes

    name = fields.String(required=True, validate=validate.Length(min=1))
    exec_type = fields.Enum(ExecutorType, by_value=True, required=True)
    endpoint = fields.Url(required=True, require_tld=False, schemes={"http", "https"})
    # The least time a job gets on this backend; longer jobs get more (JOB_TIMEOUT_*).
    timeout = fields.Float(load_default=None, validate=validate.Range(min=0, min_inclusive=False))
    gpu = fields.String(load_default="")
    model = fields.String(load_default="")
    # Optional additions: relative speed seed (1.0 = an RTX 3060) and an off switch.
    speed = fields.Float(load_default=None, validate=validate.Range(min=0, min_inclusive=False))
    disabled = fields.Boolean(load_default=False)

    @post_load
    def to_spec(self, data: dict, **_: object) -> BackendSpec:
        return BackendSpec(
            name=data["name"],
            exec_type=data["exec_type"],
            endpoint=data["endpoint"],
            timeout_s=data["timeout"],
            gpu=data["gpu"],
            model=data["model"],
            speed=data["speed"],
            disabled=data["disabled"],
        )


def load_executors(path: Path) -> list[BackendSpec]:
    """Read and check EXECUTORS_FILE. Raises ConfigError naming the file and the bad entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"EXECUTORS_FILE: {path} does not exist (create it, or set TEST_MODE=1 to run demo backends)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"EXECUTORS_FILE: {path} is not readable JSON: {exc}") from None
    if not isinstance(data, list):
        raise ConfigError(f"EXECUTORS_FILE: {path} must hold a JSON list of backends")
    try:
        specs = ExecutorEntrySchema(many=True).load(data)
    except ValidationError as exc:
        raise ConfigError(f"EXECUTORS_FILE: {path} has a bad entry: {exc.normalized_messages()}") from None
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"EXECUTORS_FILE: {path} names a backend twice: {', '.join(duplicates)}")
    return specs


def build_backend(spec: BackendSpec, session: aiohttp.ClientSession, kandinsky_api_token: str) -> Backend:
    if spec.exec_type is ExecutorType.AUTOMATIC1111:
        return Automatic1111Backend(spec, session)
    return KandinskyBackend(spec, session, kandinsky_api_token)
