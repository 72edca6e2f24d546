"""Wire messages (docs/protocol.md) as marshmallow schemas, and the answers built from them.

Incoming requests are loaded by `parse_request`; every answer to a client is dumped through
`ResponseSchema` or `InfoSchema`, so the shapes live in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from app.domain import json_text
from app.domain.errors import InvalidRequest
from app.domain.fast_checks import QuickLoader
from app.domain.jobs import SUPPORTED_GEN_TYPES, ExecutorType, GenType, Job, JobStatus
from app.domain.payloads import Flag, WholeNumber, check_payload

# How deep a message may nest objects and arrays. Real requests use 3 or 4 levels; the limit
# keeps every stored document readable by json.loads in any call stack.
MAX_NESTING_DEPTH = 32
# An error answer names at most this many fields, in at most this many characters.
MAX_REPORTED_ERRORS = 20
MAX_ERROR_SUMMARY_CHARS = 2000


class SettingsSchema(Schema):
    """Per-request flags. Keys we do not know are echoed back untouched."""

    class Meta:
        unknown = INCLUDE

    premium = Flag(load_default=False)
    moderate = Flag(load_default=False)
    sync_with_s3 = Flag(load_default=False)
    require_ack = Flag(
        load_default=False,
        metadata={
            "description": "Additive: the final answer is sent again (to the next connection, also "
            "after a restart) until the client acknowledges it with an `ack` action."
        },
    )


MAX_REQUEST_ID_CHARS = 200


def _check_request_id(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValidationError("Must be a string or an integer.")
    if isinstance(value, str) and not 0 < len(value) <= MAX_REQUEST_ID_CHARS:
        raise ValidationError(f"Must be 1 to {MAX_REQUEST_ID_CHARS} characters.")


class ServiceInfoSchema(Schema):
    """The bot's own bookkeeping; extra keys are echoed back untouched."""

    class Meta:
        unknown = INCLUDE

    user_id = WholeNumber(required=True)
    chat_id = WholeNumber(allow_none=True)
    message_id = WholeNumber(allow_none=True)
    request_id = fields.Raw(
        metadata={
            "oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_REQUEST_ID_CHARS}, {"type": "integer"}],
            "description": "Additive: the client's idempotency key. A request repeating a key already "
            "used by this service is not queued again: the answer is the original "
            "request (its object_id and current state).",
        },
        validate=_check_request_id,
    )


class RequestMessageSchema(Schema):
    message_type = fields.String(required=True, validate=validate.Equal("request"))
    executor = fields.Enum(ExecutorType, by_value=True, required=True)
    gen_type = fields.Enum(GenType, by_value=True, required=True)
    settings = fields.Dict(load_default=dict)
    service_info = fields.Dict(required=True)
    payload = fields.Dict(required=True)


class ResultSchema(Schema):
    content_type = fields.String(required=True, validate=validate.OneOf(["text", "base64", "image_url"]))
    content = fields.String(required=True)
    file_name = fields.String()


class ResponseSchema(Schema):
    """A `response` message. Short form (queued/generating) leaves out result, settings and
    payload; the full form (ok/error) has them."""

    object_id = fields.String(required=True)
    service = fields.String(required=True)
    message_type = fields.Constant("response")
    executor = fields.String(required=True, validate=validate.OneOf([e.value for e in ExecutorType]))
    gen_type = fields.String(required=True, validate=validate.OneOf([g.value for g in GenType]))
    gen_status = fields.String(required=True, validate=validate.OneOf([s.value for s in JobStatus]))
    avg_time = fields.Float(allow_none=True)
    result = fields.Nested(ResultSchema)
    settings = fields.Dict()
    service_info = fields.Dict()
    payload = fields.Dict()
    code = fields.String(
        metadata={
            "description": "Additive, on a request refused before it was queued: why, as a stable "
            "machine-readable code (docs/protocol.md lists them)."
        }
    )
    retry_after_s = fields.Float(
        metadata={"description": "Additive, with code rate_limited: seconds until the service may send again."}
    )


class InfoSchema(Schema):
    """An additive `info` message (the official client ignores these). `info_type` says what
    it is about:

    error       a message that could not be tied to a request was refused (`errors` maps
                fields to reasons, `code` says why in one word)
    no_backend  the request is queued, but no backend of its type is in service
    progress    `progress` (0..1) and `eta_relative` (seconds left) of a generating request
    unknown_field  the request was queued, but its payload has keys the backend does not know;
                they were forwarded unchanged. `unknown_fields` maps each (up to 20) to the nearest
                known key or null
    retrying    the request's attempt failed (`content` says why); it runs again in
                `retry_in_s` seconds, on another backend when one is healthy
    cancel      the answer to a cancel action: `outcome` is "cancelled", "finishing" (too late:
                its final answer is on its way) or "not_found"; `content` says it in words
    ack         the answer to an ack action: `outcome` is "acked" or "not_found"
    duplicate   a request repeated a request_id whose final answer is being sent right now
                (to this or another connection of the service); it was not queued again
    eta         a waiting request's estimate moved: ready in about `eta_s` seconds from now
    storage_retry  the server's database refused a write of this request's progress; the
                request is kept, and the write is retried until the database takes it
    """

    message_type = fields.Constant("info")
    info_type = fields.String(required=True)
    content = fields.String(required=True)
    object_id = fields.String()
    errors = fields.Dict()
    progress = fields.Float()
    eta_relative = fields.Float(allow_none=True)
    eta_s = fields.Float()
    attempt = fields.Integer()
    retry_in_s = fields.Float()
    unknown_fields = fields.Dict(keys=fields.String(), values=fields.String(allow_none=True))
    outcome = fields.String()
    code = fields.String()
    retry_after_s = fields.Float()


class ActionSchema(Schema):
    """Client -> server, additive: `{"message_type": "info", "action": "cancel" | "ack",
    "object_id": ...}`. `cancel` stops a queued or running request; `ack` acknowledges its
    final answer (see settings.require_ack)."""

    message_type = fields.String(required=True, validate=validate.Equal("info"))
    action = fields.String(required=True, validate=validate.OneOf(["cancel", "ack"]))
    object_id = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{24}$"))


_request_schema = RequestMessageSchema()
_settings_schema = SettingsSchema()
_service_info_schema = ServiceInfoSchema()
# The usual request passes these quick checks; the schemas load (and word the errors of) the rest.
_quick_request = QuickLoader(_request_schema)
_quick_settings = QuickLoader(_settings_schema)
_quick_service_info = QuickLoader(_service_info_schema)
_response_schema = ResponseSchema()
_action_schema = ActionSchema()


def decode_message(data: bytes, what: str = "Message") -> dict[str, Any]:
    """A websocket text frame (or an HTTP body: `what`="Body"), as received, as a JSON object.
    Raises InvalidRequest otherwise: not UTF-8, not JSON, not an object, NaN or Infinity (not
    JSON, and not parseable by JavaScript or Go clients it would be echoed to), or nested
    deeper than MAX_NESTING_DEPTH (so whatever is stored can always be read back)."""
    too_deep = f"{what} is nested too deeply (the limit is {MAX_NESTING_DEPTH} levels)."
    try:
        message = json_text.loads(data, max_depth=MAX_NESTING_DEPTH, parse_constant=_refuse_constant)
    except (RecursionError, json_text.TooDeep):
        raise InvalidRequest(too_deep) from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}.") from None
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidRequest(f"{what} must be a JSON object.")
    return message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_request(message: dict[str, Any]) -> dict[str, Any]:
    """Load one request message and check its payload against the backend contract.

    Returns the envelope with `executor`/`gen_type` as enums, `settings`, `service_info` and
    `payload` exactly as sent, `flags`: the settings flags as bools with defaults, and
    `unknown_fields`: the payload keys the backend does not know (payloads.UnknownFields, or
    None), which are forwarded all the same. Raises InvalidRequest naming every bad field;
    its `envelope` carries executor and gen_type only when both were valid.
    """
    loaded = _quick_request.load(message)
    if loaded is None:
        try:
            loaded = _request_schema.load(message)
        except ValidationError as exc:
            raise InvalidRequest(
                _summary(exc.normalized_messages()),
                field_errors=exc.normalized_messages(),
                envelope=readable_envelope(message),
            ) from None

    executor, gen_type = loaded["executor"], loaded["gen_type"]
    if gen_type not in SUPPORTED_GEN_TYPES[executor]:
        can_do = ", ".join(sorted(g.value for g in SUPPORTED_GEN_TYPES[executor]))
        raise InvalidRequest(
            f"{executor.value} does not support {gen_type.value} (it does {can_do}).",
            field_errors={"gen_type": [f"Not supported by {executor.value}."]},
            envelope=readable_envelope(message),
        )

    # settings and service_info are checked, but kept as sent: they are echoed back verbatim.
    field_errors: dict[str, Any] = {}
    for name, quick, schema in (
        ("settings", _quick_settings, _settings_schema),
        ("service_info", _quick_service_info, _service_info_schema),
    ):
        checked = quick.load(loaded[name])
        if checked is None:
            try:
                checked = schema.load(loaded[name])
            except ValidationError as exc:
                field_errors[name] = exc.normalized_messages()
        if name == "settings":
            loaded["flags"] = checked
    try:
        loaded["unknown_fields"] = check_payload(executor, gen_type, loaded["payload"])
    except ValidationError as exc:
        field_errors["payload"] = exc.normalized_messages()
    if field_errors:
        raise InvalidRequest(_summary(field_errors), field_errors=field_errors, envelope=readable_envelope(message))
    return loaded


def readable_envelope(message: dict[str, Any]) -> dict[str, Any]:
    """What can be echoed in an error `response`: only when executor and gen_type are valid
    values, since the official client parses both with its enums."""
    try:
        executor = ExecutorType(message.get("executor"))
        gen_type = GenType(message.get("gen_type"))
    except ValueError:
        return {}
    envelope: dict[str, Any] = {"executor": executor, "gen_type": gen_type}
    for name in ("settings", "service_info", "payload"):
        if isinstance(message.get(name), dict):
            envelope[name] = message[name]
    return envelope


def _summary(field_errors: dict[str, Any]) -> str:
    """One readable sentence out of marshmallow's nested messages (the first
    MAX_REPORTED_ERRORS of them, at most MAX_ERROR_SUMMARY_CHARS)."""
    parts: list[str] = []
    for path, reason in _walk(field_errors, ""):
        if len(parts) == MAX_REPORTED_ERRORS:
            parts.append("and more")
            break
        parts.append(f"{path}: {reason}")
    summary = "Invalid request: " + "; ".join(parts)
    return summary if len(summary) <= MAX_ERROR_SUMMARY_CHARS else summary[:MAX_ERROR_SUMMARY_CHARS] + "..."


def bounded_errors(field_errors: dict[str, Any] | None) -> dict[str, Any] | None:
    """`field_errors` as echoed to a client: cut to MAX_REPORTED_ERRORS entries per level."""
    if not isinstance(field_errors, dict):
        return field_errors
    kept = list(field_errors.items())[:MAX_REPORTED_ERRORS]
    return {
        str(key)[:200]: bounded_errors(value)
        if isinstance(value, dict)
        else (value[:MAX_REPORTED_ERRORS] if isinstance(value, list) else value)
        for key, value in kept
    }


def _walk(messages: Any, prefix: str):
    if isinstance(messages, dict):
        for key, value in messages.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(messages, list):
        for item in messages:
            yield from _walk(item, prefix)
    else:
        yield prefix, str(messages).rstrip(".")


def short_response(job: Job, gen_status: str, avg_time_s: float | None) -> dict[str, Any]:
    """The queued/generating form: what ResponseSchema dumps (tests/test_quick_checks.py holds
    them equal), built directly because every request gets one or two."""
    return job.response_head(gen_status) | {
        "avg_time": None if avg_time_s is None else float(avg_time_s),
        "service_info": job.service_info,
    }


def final_response(job: Job) -> dict[str, Any]:
    """The ok/error form, from a finished job (status and result set): what ResponseSchema
    dumps (tests/test_quick_checks.py holds them equal), built directly because every request
    gets one."""
    return job.response_head(job.status.value) | {
        "avg_time": 0.0,
        "result": None if job.result is None else _result(job.result),
        "settings": dict(job.settings),
        "service_info": dict(job.service_info),
        "payload": dict(job.payload) if job.payload is not None else None,
    }


def _result(result: dict[str, Any]) -> dict[str, Any]:
    """A final's `result`, as ResultSchema dumps it (its declared keys, those present)."""
    dumped: dict[str, str | None] = {"content_type": str(result["content_type"]), "content": str(result["content"])}
    if "file_name" in result:
        dumped["file_name"] = None if result["file_name"] is None else str(result["file_name"])
    return dumped


def rejection_response(object_id: str, service: str, error: InvalidRequest) -> dict[str, Any]:
    """An error `response` for a message that was refused before it was queued."""
    envelope = error.envelope
    return _response_schema.dump(
        {
            "object_id": object_id,
            "service": service,
            "executor": envelope["executor"].value,
            "gen_type": envelope["gen_type"].value,
            "gen_status": "error",
            "avg_time": 0.0,
            "result": {"content_type": "text", "content": error.reason},
            "settings": envelope.get("settings", {}),
            "service_info": envelope.get("service_info", {}),
            "payload": envelope.get("payload", {}),
            "code": error.code,
            **({"retry_after_s": error.retry_after_s} if error.retry_after_s is not None else {}),
        }
    ) | {"errors": bounded_errors(error.field_errors)}


def info_message(info_type: str, content: str, **extra: Any) -> dict[str, Any]:
    """An info message; `extra` holds the optional InfoSchema fields (None values left out, as
    are names the schema does not have). What InfoSchema dumps (tests/test_quick_checks.py holds
    them equal), built directly: when estimates move, every waiting request gets one."""
    message = {"message_type": "info", "info_type": str(info_type), "content": str(content)}
    for name, dump in _INFO_OPTIONAL_FIELDS.items():
        value = extra.get(name)
        if value is not None:
            message[name] = dump(value)
    return message


def _unknown_fields(value: dict[Any, Any]) -> dict[str, str | None]:
    return {str(key): None if hint is None else str(hint) for key, hint in value.items()}


# InfoSchema's optional fields in its order, each with how it dumps a value.
_INFO_OPTIONAL_FIELDS: dict[str, Callable[[Any], Any]] = {
    "object_id": str,
    "errors": dict,
    "progress": float,
    "eta_relative": float,
    "eta_s": float,
    "attempt": int,
    "retry_in_s": float,
    "unknown_fields": _unknown_fields,
    "outcome": str,
    "code": str,
    "retry_after_s": float,
}


def parse_action(message: dict[str, Any]) -> tuple[str, str]:
    """(action, object_id) of a client action. Raises InvalidRequest when it is malformed."""
    try:
        loaded = _action_schema.load(message)
        return loaded["action"], loaded["object_id"]
    except ValidationError as exc:
        raise InvalidRequest(_summary(exc.normalized_messages()), field_errors=exc.normalized_messages()) from None
