"""Every route of the server, listed once: registered from this table, and documented from it
(app/web/openapi.py), so the OpenAPI document cannot miss a route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from marshmallow import Schema

from app.web import api, pages
from app.web.api_schemas import (
    BackendStateSchema,
    CancelResultSchema,
    ErrorSchema,
    HealthSchema,
    IdentitySchema,
    MirrorStateSchema,
    QueueStateSchema,
    StatusSchema,
    SubmittedSchema,
)
from app.web.gateway import websocket_handler
from app.web.schemas import ResponseSchema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ERROR = ErrorSchema


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    # status -> (description, schema class, or a media type for non-JSON bodies)
    responses: dict[int, tuple[str, type[Schema] | str]]
    body: str | None = None  # a component schema of the OpenAPI document
    needs_key: bool = False
    tags: tuple[str, ...] = field(default=())


OBJECT_ID_PATH = "/api/v1/requests/{object_id}"

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/",
        pages.home,
        "home",
        "Identity document (JSON); a browser asking for HTML gets the live status page",
        {200: ("Identity, or the status page as text/html", IdentitySchema)},
        tags=("operations",),
    ),
    Route(
        "GET",
        "/status.json",
        pages.status,
        "status",
        "What the status page shows: queues, backends, mirrors, recent requests, the last hour's history",
        {200: ("Live status", StatusSchema), 404: ("STATUS_PAGE=0", "text/plain")},
        tags=("operations",),
    ),
    Route(
        "GET",
        "/favicon.ico",
        pages.favicon,
        "favicon",
        "The status page's icon (SVG)",
        {200: ("The icon", "image/svg+xml")},
        tags=("operations",),
    ),
    Route(
        "GET",
        "/health",
        api.health,
        "health",
        "200 when the database takes writes and the scheduler runs, 503 otherwise",
        {200: ("Healthy", HealthSchema), 503: ("Unavailable, with the reason", HealthSchema)},
        tags=("operations",),
    ),
    Route(
        "GET",
        "/metrics",
        api.metrics,
        "metrics",
        "Prometheus metrics",
        {200: ("Prometheus text format", "text/plain")},
        tags=("operations",),
    ),
    Route(
        "POST",
        "/api/v1/requests",
        api.submit_request,
        "submit_request",
        "Submit a generation request (the websocket's request message as the body)",
        {
            202: ("Queued", SubmittedSchema),
            400: ("Invalid request", ERROR),
            401: ("Wrong key or service", ERROR),
            413: ("Body too large", ERROR),
        },
        body="RequestMessage",
        needs_key=True,
        tags=("requests",),
    ),
    Route(
        "GET",
        OBJECT_ID_PATH,
        api.get_request,
        "get_request",
        "A request's current state; its full answer (result included) once final",
        {
            200: ("State or final answer", ResponseSchema),
            401: ("Wrong key or service", ERROR),
            404: ("No such request of this service", ERROR),
        },
        needs_key=True,
        tags=("requests",),
    ),
    Route(
        "POST",
        OBJECT_ID_PATH + "/cancel",
        api.cancel_request,
        "cancel_request",
        'Cancel a queued or running request (its record stays, ending in error "cancelled")',
        {
            200: ("Cancelled", CancelResultSchema),
            401: ("Wrong key or service", ERROR),
            404: ("No such request of this service", ERROR),
            409: ("Already final", ERROR),
        },
        needs_key=True,
        tags=("requests",),
    ),
    Route(
        "GET",
        "/api/v1/queues",
        api.queues,
        "queues",
        "Per executor type: requests waiting (general, premium), generating, ETA of a new one",
        {200: ("Queue states", QueueStateSchema), 401: ("Wrong key or service", ERROR)},
        needs_key=True,
        tags=("operations",),
    ),
    Route(
        "GET",
        "/api/v1/backends",
        api.backends,
        "backends",
        "Backends with their state, learned speed and current job",
        {200: ("Backend states", BackendStateSchema), 401: ("Wrong key or service", ERROR)},
        needs_key=True,
        tags=("operations",),
    ),
    Route(
        "GET",
        "/api/v1/mirrors",
        api.mirrors,
        "mirrors",
        "Mirrors (MongoDB, S3) and their backlog",
        {200: ("Mirror states", MirrorStateSchema), 401: ("Wrong key or service", ERROR)},
        needs_key=True,
        tags=("operations",),
    ),
    Route(
        "GET",
        "/img/{file_name}",
        pages.image,
        "image",
        "A result image saved locally, at the URL of its ok message (with `?key=`, the image's key)",
        {200: ("The JPEG", "image/jpeg"), 404: ("No such image, or a missing or wrong key", "text/plain")},
        tags=("requests",),
    ),
    Route(
        "GET",
        "/ws",
        websocket_handler,
        "websocket",
        "Websocket for bot services (messages: RequestMessage, Action -> Response, Info)",
        {
            101: ("Upgraded", "text/plain"),
            400: ("Not a websocket upgrade", "text/plain"),
            401: ("Wrong key or service (before the upgrade)", "text/plain"),
        },
        needs_key=True,
        tags=("websocket",),
    ),
    Route(
        "GET",
        "/ws/{service}",
        websocket_handler,
        "websocket_for_service",
        "The same websocket, as the official client connects to it",
        {
            101: ("Upgraded", "text/plain"),
            400: ("Not a websocket upgrade", "text/plain"),
            401: ("Wrong key or service (before the upgrade)", "text/plain"),
        },
        needs_key=True,
        tags=("websocket",),
    ),
    Route(
        "GET",
        "/openapi.json",
        pages.openapi_document,
        "openapi",
        "This document",
        {200: ("OpenAPI 3 document", "application/json")},
        tags=("operations",),
    ),
    Route(
        "GET",
        "/docs",
        pages.docs,
        "docs",
        "Swagger UI (served from this server, works offline)",
        {200: ("HTML", "text/html")},
        tags=("operations",),
    ),
)

# LIST_ROUTES answer JSON arrays of their schema.
LIST_ROUTES = frozenset({"queues", "backends", "mirrors"})


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.name)
    pages.add_static(app)
