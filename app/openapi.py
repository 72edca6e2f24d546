"""The OpenAPI 3 document, generated (apispec) from the route table and the same marshmallow
schemas that validate input, so the docs cannot drift from validation."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from app.routes import LIST_ROUTES, ROUTES, Route
from app.schemas import CancelActionSchema, InfoSchema, RequestMessageSchema, ResponseSchema

SECURITY = [{"serviceKey": [], "serviceName": []}]
# Documented as schemas although they travel over the websocket.
WEBSOCKET_MESSAGES = {"RequestMessage": RequestMessageSchema, "CancelAction": CancelActionSchema,
                      "Response": ResponseSchema, "Info": InfoSchema}
_PATH_PARAMETER = re.compile(r"{(\w+)}")
_PARAMETER_PATTERNS = {"object_id": "^[0-9a-f]{24}$", "file_name": "^[0-9a-f]{24}\\.jpg$"}


def build_spec(title: str, version: str) -> dict[str, Any]:
    spec = APISpec(title=title, version=version, openapi_version="3.0.3",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "Durable balancer for image-generation backends. Bot services "
                                        "use the websocket; the HTTP API offers the same requests and "
                                        "the operator's views. Keys go in the `authorization` and "
                                        "`service` headers."})
    spec.components.security_scheme("serviceKey", {"type": "apiKey", "in": "header", "name": "authorization"})
    spec.components.security_scheme("serviceName", {"type": "apiKey", "in": "header", "name": "service"})
    for name, schema in WEBSOCKET_MESSAGES.items():
        spec.components.schema(name, schema=schema)
    for route in ROUTES:
        spec.path(path=route.path, operations={route.method.lower(): _operation(route)})
    return spec.to_dict()


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary, "operationId": route.name,
                                 "tags": list(route.tags), "responses": {}}
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", **({"pattern": _PARAMETER_PATTERNS[name]}
                                                   if name in _PARAMETER_PATTERNS else {})}}
                  for name in _PATH_PARAMETER.findall(route.path)]
    if parameters:
        operation["parameters"] = parameters
    if route.needs_key:
        operation["security"] = SECURITY
    if route.body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": route.body}}}
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
