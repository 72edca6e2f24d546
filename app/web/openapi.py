"""The OpenAPI 3 document, generated (apispec) from the route table and the same marshmallow
schemas that validate input, so the docs cannot drift from validation."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields, validate

from app.domain.jobs import SUPPORTED_GEN_TYPES
from app.domain.payloads import BASE64_IMAGE_PATTERN, PAYLOAD_SCHEMAS
from app.web.routes import LIST_ROUTES, ROUTES, Route
from app.web.schemas import ActionSchema, InfoSchema, ResponseSchema, ServiceInfoSchema, SettingsSchema

SECURITY: list[dict[str, list[str]]] = [{"serviceKey": [], "serviceName": []}]
# Documented as schemas although they travel over the websocket.
WEBSOCKET_MESSAGES = {"Action": ActionSchema, "Response": ResponseSchema, "Info": InfoSchema}
_PATH_PARAMETER = re.compile(r"{(\w+)}")
_PARAMETER_PATTERNS = {"object_id": "^[0-9a-f]{24}$", "file_name": "^[0-9a-f]{24}\\.jpg$"}


def build_spec(title: str, version: str) -> dict[str, Any]:
    spec = APISpec(
        title=title,
        version=version,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Durable balancer for image-generation backends. Bot services "
            "use the websocket; the HTTP API offers the same requests and "
            "the operator's views. Keys go in the `authorization` and "
            "`service` headers."
        },
    )
    spec.components.security_scheme("serviceKey", {"type": "apiKey", "in": "header", "name": "authorization"})
    spec.components.security_scheme("serviceName", {"type": "apiKey", "in": "header", "name": "service"})
    for name, schema in WEBSOCKET_MESSAGES.items():
        spec.components.schema(name, schema=schema)
    # A request message is one of the valid executor/gen_type pairs, each with the payload
    # schema that validates it.
    variants = []
    for (executor, gen_type), payload_schema in PAYLOAD_SCHEMAS.items():
        assert gen_type in SUPPORTED_GEN_TYPES[executor]
        name = f"{executor.value.capitalize()}{gen_type.value.capitalize()}Request"
        spec.components.schema(
            name, schema=_request_variant(name, executor.value, gen_type.value, type(payload_schema))
        )
        variants.append({"$ref": f"#/components/schemas/{name}"})
    spec.components.schema("RequestMessage", {"oneOf": variants})
    for route in ROUTES:
        spec.path(path=route.path, operations={route.method.lower(): _operation(route)})
    document = spec.to_dict()
    # OpenAPI 3.1 (JSON Schema 2020-12) can say what each position of images_texts holds;
    # marshmallow's field metadata cannot carry prefixItems, so it is set here.
    mix = document["components"]["schemas"]["KandinskyMix2Images"]["properties"]["images_texts"]
    mix["prefixItems"] = [
        {"type": "string"},
        {"type": "string", "pattern": BASE64_IMAGE_PATTERN},
        {"type": "string", "pattern": BASE64_IMAGE_PATTERN},
        {"type": "string"},
    ]
    mix["items"] = False
    return document


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.name,
        "tags": list(route.tags),
        "responses": {},
    }
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {
                "type": "string",
                **({"pattern": _PARAMETER_PATTERNS[name]} if name in _PARAMETER_PATTERNS else {}),
            },
        }
        for name in _PATH_PARAMETER.findall(route.path)
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.needs_key:
        operation["security"] = SECURITY
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
        }
    for status, (description, body) in route.responses.items():
        if isinstance(body, str):
            content = {body: {"schema": {"type": "string"}}}
        else:
            schema: Any = body
            if route.name in LIST_ROUTES and status == 200:
                schema = {"type": "array", "items": body}
            content = {"application/json": {"schema": schema}}
        operation["responses"][str(status)] = {"description": description, "content": content}
    return operation


def _request_variant(name: str, executor: str, gen_type: str, payload: type[Schema]) -> type[Schema]:
    return Schema.from_dict(
        {
            "message_type": fields.String(required=True, validate=validate.OneOf(["request"])),
            "executor": fields.String(required=True, validate=validate.OneOf([executor])),
            "gen_type": fields.String(required=True, validate=validate.OneOf([gen_type])),
            "settings": fields.Nested(SettingsSchema),
            "service_info": fields.Nested(ServiceInfoSchema, required=True),
            "payload": fields.Nested(payload, required=True),
        },
        name=name,
    )
