"""The intake's quick checks (app/domain/fast_checks.py) never accept what the marshmallow schemas would
refuse, and load what they accept exactly as the schemas do: a bot cannot tell which path
its request took, except by speed."""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from app.domain import fast_checks, payloads
from app.domain.jobs import SUPPORTED_GEN_TYPES, ExecutorType, JobStatus
from app.domain.payloads import PAYLOAD_SCHEMAS, check_payload
from app.web import schemas
from bench.images import png_base64
from tests.conftest import new_job

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE = png_base64()

# Values of every JSON type, including the edges the checks must not wave through: bools where
# numbers go, whole floats, out-of-range numbers, empty strings, nulls, broken base64.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 8192, 8193, 1000, 1001, 64, 65, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, 1.0, 5.0, 8.0, 9.0, -0.0]),
    st.text(max_size=8),
    st.sampled_from(
        ["", "5", " 7 ", IMAGE, "data:image/png;base64," + IMAGE, IMAGE[:-2], "iVBORw0KGgo", "request", "automatic1111"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)


def schema_accepts(schema, data) -> bool:
    try:
        schema.load(data)
    except ValidationError:
        return False
    return True


@PROPERTY_SETTINGS
@given(key=st.sampled_from(sorted(PAYLOAD_SCHEMAS)), data=st.data())
def test_a_payload_field_the_quick_check_accepts_is_one_its_schema_accepts(key, data):
    schema = PAYLOAD_SCHEMAS[key]
    name = data.draw(st.sampled_from(sorted(schema.fields)))
    value = data.draw(values | st.lists(st.sampled_from([IMAGE, "a", 3, 0.5]), max_size=5))
    check = fast_checks.field_check(schema.fields[name])
    if check is not None and check(value):
        assert schema_accepts(type(schema)(only=(name,)), {name: value}), (name, value)


@PROPERTY_SETTINGS
@given(key=st.sampled_from(sorted(PAYLOAD_SCHEMAS)), data=st.data())
def test_check_payload_refuses_exactly_what_the_whole_schema_refuses(key, data):
    schema = PAYLOAD_SCHEMAS[key]
    names = data.draw(st.lists(st.sampled_from(sorted(schema.fields) + ["stpes", "extension"]), max_size=6))
    payload = {name: data.draw(values) for name in names}
    try:
        check_payload(*key, payload)
        quick_says = True
    except ValidationError:
        quick_says = False
    assert quick_says == schema_accepts(schema, payload), payload


settings_dicts = st.dictionaries(
    st.sampled_from(["premium", "moderate", "sync_with_s3", "require_ack", "extra"]), values, max_size=5
)
service_infos = st.dictionaries(
    st.sampled_from(["user_id", "chat_id", "message_id", "request_id", "x"]), values, max_size=5
)
envelopes = st.fixed_dictionaries(
    {
        "message_type": st.sampled_from(["request", "info", 5]),
        "executor": st.sampled_from(["automatic1111", "kandinsky", "other", None]),
        "gen_type": st.sampled_from(["text2img", "img2img", "mix2img", "nope"]),
        "service_info": service_infos | values,
        "payload": st.just({"prompt": "p"}) | values,
    },
    optional={"settings": settings_dicts | values, "stray": values},
)


@PROPERTY_SETTINGS
@given(message=envelopes)
def test_a_message_loads_the_same_quickly_or_through_the_schemas(message):
    for schema in (schemas.RequestMessageSchema(), schemas.SettingsSchema(), schemas.ServiceInfoSchema()):
        data = (
            message
            if isinstance(schema, schemas.RequestMessageSchema)
            else message.get("settings" if isinstance(schema, schemas.SettingsSchema) else "service_info")
        )
        quick = fast_checks.QuickLoader(schema).load(data)
        if quick is not None:
            assert quick == schema.load(data), data


@PROPERTY_SETTINGS
@given(message=envelopes)
def test_parse_request_answers_as_the_schemas_alone_would(message):
    """The quick path changes nothing a client sees: the same request, or the same refusal."""
    try:
        parsed = schemas.parse_request(message)
    except Exception as exc:
        parsed = exc
    expected_ok = True
    try:
        loaded = schemas.RequestMessageSchema().load(message)
        schemas.SettingsSchema().load(loaded["settings"])
        schemas.ServiceInfoSchema().load(loaded["service_info"])
        if loaded["gen_type"] not in SUPPORTED_GEN_TYPES[loaded["executor"]]:
            expected_ok = False
        else:
            PAYLOAD_SCHEMAS[(loaded["executor"], loaded["gen_type"])].load(loaded["payload"])
    except ValidationError:
        expected_ok = False
    assert isinstance(parsed, dict) == expected_ok, (message, parsed)


def test_the_queued_answer_is_what_the_response_schema_dumps():
    job = new_job(object_id="0" * 24, executor=ExecutorType.AUTOMATIC1111, service_info={"user_id": 7})
    for avg_time in (None, 3, 2.5):
        built = schemas.short_response(job, "queued", avg_time)
        dumped = schemas.ResponseSchema().dump({**built})
        assert json.dumps(built) == json.dumps(dumped)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@PROPERTY_SETTINGS
@given(
    status=st.sampled_from([JobStatus.OK, JobStatus.ERROR]),
    result=st.none()
    | st.fixed_dictionaries(
        {"content_type": st.sampled_from(["text", "base64", "image_url"]), "content": st.text(max_size=20)},
        optional={"file_name": st.none() | st.text(max_size=10)},
    ),
    settings=st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=3),
    service_info=st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=3),
    payload=st.none() | st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=3),
)
def test_the_final_answer_is_what_the_response_schema_dumps(status, result, settings, service_info, payload):
    job = new_job(settings=settings, service_info=service_info, payload=payload)
    job.status, job.result = status, result
    built = schemas.final_response(job)
    dumped = schemas.ResponseSchema().dump(
        {
            **{key: built[key] for key in ("object_id", "service", "executor", "gen_type", "gen_status")},
            "avg_time": 0.0,
            "result": result,
            "settings": settings,
            "service_info": service_info,
            "payload": payload,
        }
    )
    assert json.dumps(built) == json.dumps(dumped)  # the same keys, values and order


@PROPERTY_SETTINGS
@given(
    info_type=st.sampled_from(["eta", "progress", "retrying", "error", "unknown_field"]),
    content=st.text(max_size=20),
    extra=st.fixed_dictionaries(
        {},
        optional={
            "object_id": st.none() | st.text(alphabet="0123456789abcdef", min_size=24, max_size=24),
            "errors": st.dictionaries(st.text(max_size=5), _JSON_VALUES, max_size=2),
            "progress": st.floats(0, 1) | st.integers(0, 1),
            "eta_relative": st.none() | st.floats(0, 1e6) | st.integers(0, 10**6),
            "eta_s": st.floats(0, 1e6) | st.integers(0, 10**6),
            "attempt": st.integers(1, 10),
            "retry_in_s": st.floats(0, 100),
            "unknown_fields": st.dictionaries(st.text(max_size=5), st.none() | st.text(max_size=5), max_size=3),
            "outcome": st.sampled_from(["cancelled", "finishing", "not_found", "acked"]),
            "code": st.text(max_size=10),
            "retry_after_s": st.floats(0, 100),
        },
    ),
)
def test_an_info_message_is_what_the_info_schema_dumps(info_type, content, extra):
    built = schemas.info_message(info_type, content, **extra)
    given_values = {key: value for key, value in extra.items() if value is not None}
    dumped = schemas.InfoSchema().dump({"info_type": info_type, "content": content, **given_values})
    assert json.dumps(built) == json.dumps(dumped)  # the same keys, values and order


@PROPERTY_SETTINGS
@given(
    start=st.sampled_from(
        [
            "iVBORw0KGgoAAAANSUhEUg",
            "/9j/",
            "R0lGODlh",
            "UklGRiQAAABXRUJQ",
            "SUkqAAgA",
            "data:image/png;base64,iVBORw0KGgo",
            "data:text/plain;base64,/9j/",
            "",
        ]
    ),
    rest=st.text(alphabet="ABCabc0129+/=-_ \n.é", max_size=12),
)
def test_the_image_check_matches_the_pattern_the_openapi_document_publishes(start, rest):
    text = start + rest
    assert payloads.is_base64_image(text) == bool(re.fullmatch(payloads.BASE64_IMAGE_PATTERN, text)), text
