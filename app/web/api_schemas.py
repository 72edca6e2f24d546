"""Schemas of the HTTP API's answers; the OpenAPI document is generated from these and from
the wire schemas in app/web/schemas.py."""

from __future__ import annotations

from marshmallow import Schema, fields

from app.web.schemas import InfoSchema, ResponseSchema


class ErrorBodySchema(Schema):
    status = fields.Integer(required=True)
    message = fields.String(required=True, metadata={"description": "A readable sentence."})
    field_errors = fields.Dict(
        required=True, data_key="fields", metadata={"description": "Offending fields -> reasons."}
    )
    code = fields.String(
        metadata={"description": "A refused request's stable reason (docs/protocol.md, refusal codes)."}
    )
    retry_after_s = fields.Float(metadata={"description": "With code rate_limited: seconds to wait."})


class ErrorSchema(Schema):
    """Every error of the HTTP API has this one shape."""

    error = fields.Nested(ErrorBodySchema, required=True)


class SubmittedSchema(ResponseSchema):
    """The `queued` answer of a submitted request, plus any info notices (e.g. no_backend)."""

    notices = fields.List(fields.Nested(InfoSchema), required=True)


class CancelResultSchema(Schema):
    object_id = fields.String(required=True)
    outcome = fields.String(required=True, metadata={"enum": ["cancelled"]})


class QueueStateSchema(Schema):
    executor = fields.String(required=True)
    general_waiting = fields.Integer(required=True)
    premium_waiting = fields.Integer(required=True)
    generating = fields.Integer(required=True)
    backends = fields.Integer(required=True)
    backends_in_service = fields.Integer(required=True)
    eta_new_general_s = fields.Float(
        required=True,
        allow_none=True,
        metadata={
            "description": "Seconds until a typical new general request is done; null if no backend is in service."
        },
    )
    eta_new_premium_s = fields.Float(required=True, allow_none=True)


class BackendStateSchema(Schema):
    name = fields.String(required=True)
    executor = fields.String(required=True)
    state = fields.String(required=True, metadata={"enum": ["starting", "healthy", "busy", "unhealthy", "disabled"]})
    units_per_s = fields.Integer(required=True, metadata={"description": "Learned speed, cost units/s."})
    images_per_minute = fields.Float(
        required=True,
        metadata={"description": "The learned speed in 512x512, 50-step images per minute (the reference job)."},
    )
    jobs_done = fields.Integer(required=True)
    last_error = fields.String(required=True)
    job = fields.String(required=True, allow_none=True, metadata={"description": "object_id it runs."})


class MirrorStateSchema(Schema):
    name = fields.String(required=True)
    state = fields.String(required=True, metadata={"enum": ["starting", "connected", "down"]})
    backlog = fields.Integer(required=True)
    last_error = fields.String(required=True)
    last_success_at = fields.Float(required=True, allow_none=True)


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    reason = fields.String(required=True)


class IdentitySchema(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True)
    websocket = fields.String(required=True)


class RecentRequestSchema(Schema):
    object_id = fields.String(required=True, allow_none=True, metadata={"description": "null in the public view."})
    service = fields.String(required=True, allow_none=True, metadata={"description": "null in the public view."})
    executor = fields.String(required=True)
    gen_type = fields.String(required=True)
    status = fields.String(required=True)
    created_at = fields.Float(required=True)
    thumbnail = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "The image's URL (the page shows it small and links to it); null in the public view."},
    )
    prompt = fields.String(
        required=True, allow_none=True, metadata={"description": "First 120 characters; null in the public view."}
    )
    premium = fields.Boolean(required=True)
    backend = fields.String(required=True, allow_none=True)
    wait_s = fields.Float(required=True, allow_none=True, metadata={"description": "From queued to its last start."})
    generation_s = fields.Float(required=True, allow_none=True)


class QueueSampleSchema(Schema):
    executor = fields.String(required=True)
    class_ = fields.String(required=True, data_key="class", attribute="class")
    waiting = fields.Integer(required=True)


class HistorySampleSchema(Schema):
    t = fields.Float(required=True, metadata={"description": "Unix time of the sample."})
    queues = fields.List(fields.Nested(QueueSampleSchema), required=True)
    finished_last_minute = fields.Integer(required=True)
    busy = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        required=True,
        metadata={"description": "Backend -> share of the time since the previous sample it ran a job."},
    )


class EtaOutcomeSchema(Schema):
    t = fields.Float(required=True, metadata={"description": "When the request finished."})
    told_s = fields.Float(required=True, metadata={"description": "avg_time of its queued answer."})
    actual_s = fields.Float(required=True, metadata={"description": "Seconds from queued to its final."})


class HistorySchema(Schema):
    """The last hour, for the charts (in memory: a restart starts afresh)."""

    sample_s = fields.Float(required=True)
    samples = fields.List(fields.Nested(HistorySampleSchema), required=True)
    eta = fields.List(fields.Nested(EtaOutcomeSchema), required=True)


class StatusSchema(Schema):
    """What the status page shows. Without STATUS_PAGE_KEY (the public view) it leaves out what
    belongs to a service or could leak a request: ids, services, thumbnails, error texts."""

    detailed = fields.Boolean(required=True)
    queues = fields.List(fields.Nested(QueueStateSchema), required=True)
    backends = fields.List(fields.Nested(BackendStateSchema), required=True)
    mirrors = fields.List(fields.Nested(MirrorStateSchema), required=True)
    recent = fields.List(fields.Nested(RecentRequestSchema), required=True)
    history = fields.Nested(HistorySchema, required=True)
