"""The HTTP API: the same requests as the websocket, plus the operator's views.

Every route under /api/ takes the service key in the same headers as the websocket
(`authorization`, `service`), and every error has one JSON shape (ErrorSchema):
`{"error": {"status": 400, "message": "...", "fields": {...}}}`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from app import keys
from app.domain.errors import DevoidError, InvalidRequest, Refusal
from app.domain.jobs import Job
from app.domain.lifecycle import CancelOutcome
from app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from app.web.api_schemas import (
    BackendStateSchema,
    CancelResultSchema,
    ErrorSchema,
    HealthSchema,
    MirrorStateSchema,
    QueueStateSchema,
    SubmittedSchema,
)
from app.web.gateway import authenticate, read_off_the_loop_if_long
from app.web.schemas import bounded_errors, decode_message, final_response, parse_request, short_response

log = logging.getLogger(__name__)

OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
HEALTH_WRITE_TIMEOUT_S = 2.0
NOT_FOUND = "No request of this service has that object_id."

_error_schema = ErrorSchema()
_submitted_schema = SubmittedSchema()
_queues_schema = QueueStateSchema(many=True)
_backends_schema = BackendStateSchema(many=True)
_mirrors_schema = MirrorStateSchema(many=True)


def error_response(
    status: int,
    message: str,
    field_errors: dict | None = None,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
    retry_after_s: float | None = None,
) -> web.Response:
    error = {"status": status, "message": message, "field_errors": field_errors or {}}
    if code is not None:
        error["code"] = code
    if retry_after_s is not None:
        error["retry_after_s"] = retry_after_s
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after_s)))}
    return web.json_response(_error_schema.dump({"error": error}), status=status, headers=headers)


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure of an /api/ route into the one error shape."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except DevoidError as exc:
        return error_response(
            exc.status, exc.reason, bounded_errors(exc.field_errors), code=exc.code, retry_after_s=exc.retry_after_s
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Keep what the exception says in headers (Allow on a 405).
        headers = {key: value for key, value in exc.headers.items() if key.lower() == "allow"}
        code = Refusal.MESSAGE_TOO_LARGE.value if exc.status == 413 else None
        return error_response(exc.status, exc.text or exc.reason, headers=headers, code=code)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "Internal error; it has been logged.")


def _authenticate(request: web.Request) -> str:
    if request.match_info.get("service"):  # the API names the service in the header only
        raise web.HTTPUnauthorized(text="Service or key is not valid.")
    return authenticate(request)


async def submit_request(request: web.Request) -> web.Response:
    """POST /api/v1/requests: the websocket's request message as the body."""
    service = _authenticate(request)
    try:
        return await _submit(request, service)
    except InvalidRequest as refused:  # answered by api_errors; counted here, as on the websocket
        request.app[keys.METRICS].request_refused(refused.code, service)
        raise


def _checked_body(body: bytes) -> dict[str, Any]:
    """The request in a body, checked (schemas.parse_request). Raises InvalidRequest."""
    return parse_request(decode_message(body, what="Body"))


async def _submit(request: web.Request, service: str) -> web.Response:
    body = await request.read()
    limit = request.app[keys.CONFIG].max_message_bytes
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(
            max_size=limit,
            actual_size=len(body),
            text=f"Body is {len(body)} bytes, over this server's limit of {limit} bytes (MAX_MESSAGE_BYTES).",
        )
    checked = await read_off_the_loop_if_long(_checked_body, body)
    job = request.app[keys.INTAKE].job_from_request(service, checked, channel="http")
    notices: list[dict] = []

    async def announce(answer: dict) -> None:
        if answer.get("message_type") == "info":
            notices.append(answer)

    queued = await request.app[keys.INTAKE].accept(job, announce)
    return web.json_response(_submitted_schema.dump({**queued, "notices": notices}), status=202)


async def _own_job(request: web.Request) -> Job:
    service = _authenticate(request)
    object_id = request.match_info["object_id"]
    job = await request.app[keys.STORE].reads.get(object_id) if OBJECT_ID.match(object_id) else None
    # Another service's request is "not found" too: ids cannot be probed.
    if job is None or job.service != service:
        raise web.HTTPNotFound(text=NOT_FOUND)
    return job


async def get_request(request: web.Request) -> web.Response:
    """GET /api/v1/requests/{object_id}: current state; the full answer once final."""
    job = await _own_job(request)
    if job.status.is_final:
        if job.channel == "http" and job.delivered_at is None:
            await request.app[keys.STORE].mark_delivered([job])
        return web.json_response(final_response(job))
    return web.json_response(short_response(job, job.status.value, None))


async def cancel_request(request: web.Request) -> web.Response:
    """POST /api/v1/requests/{object_id}/cancel: cancel a queued or running request. The
    request is not deleted: it ends with the error "cancelled" and can still be fetched."""
    job = await _own_job(request)
    outcome = await request.app[keys.SCHEDULER].cancel_request(job.service, job.object_id)
    if outcome is not CancelOutcome.CANCELLED:
        status = job.status.value if job.status.is_final or outcome is CancelOutcome.NOT_FOUND else "finishing"
        raise web.HTTPConflict(text=f"The request is {status}: nothing to cancel.")
    return web.json_response(CancelResultSchema().dump({"object_id": job.object_id, "outcome": outcome.value}))


async def queues(request: web.Request) -> web.Response:
    _authenticate(request)
    return web.json_response(_queues_schema.dump(request.app[keys.SCHEDULER].fleet.queues_status()))


async def backends(request: web.Request) -> web.Response:
    _authenticate(request)
    return web.json_response(_backends_schema.dump(request.app[keys.SCHEDULER].fleet.backends_status()))


async def mirrors(request: web.Request) -> web.Response:
    _authenticate(request)
    return web.json_response(_mirrors_schema.dump([mirror.health.as_dict() for mirror in request.app[keys.MIRRORS]]))


async def health(request: web.Request) -> web.Response:
    """GET /health (no key): 200 when the database takes a write and the scheduler runs."""
    reason = ""
    scheduler = request.app[keys.SCHEDULER]
    if not scheduler.running:
        reason = "the scheduler is not running"
    else:
        try:
            await request.app[keys.STORE].check_writable(HEALTH_WRITE_TIMEOUT_S)
        except Exception as exc:
            reason = f"the database takes no writes: {type(exc).__name__} {exc}".strip()
    fine = "database writable, scheduler running"
    if scheduler.reading_backlog:
        # Serving already; worth telling an operator who watches a restart with a long queue.
        fine += ", reading back the queue stored before the start ({} of {} read)".format(*scheduler.backlog_progress())
    body = HealthSchema().dump({"status": "unavailable" if reason else "ok", "reason": reason or fine})
    return web.json_response(body, status=503 if reason else 200)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics (no key): Prometheus text format."""
    return web.Response(body=request.app[keys.METRICS].render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
