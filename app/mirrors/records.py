"""The MongoDB record of a request: small, with base64 images replaced by their size and hash."""

from __future__ import annotations

import hashlib
from typing import Any

from app.domain.jobs import Job

# Strings longer than this in a payload are images (base64 or data: URIs) in practice; they
# are summarized, so records stay small.
MAX_INLINE_CHARS = 1024


def summarize(value: Any) -> Any:
    """`value` with every long string replaced by {"chars", "sha256"}."""
    if isinstance(value, str) and len(value) > MAX_INLINE_CHARS:
        return {"chars": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}
    if isinstance(value, dict):
        return {key: summarize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [summarize(item) for item in value]
    return value


def request_record(job: Job) -> dict[str, Any]:
    """The record mirrored at every status change.

    A superset of the original product's document, whose names and shapes dashboards query:
    object_id, service, message_type ("response"), executor, gen_type, gen_status, result
    (null until final; {content_type, content, file_name} or {content_type: "text", content}),
    settings, service_info, payload. The rest is this server's own. Times are unix seconds
    (the MongoDB mirror stores them as dates); `revision` orders the versions of one record.
    """
    return job.response_head(job.status.value) | {
        "premium": job.premium,
        "settings": job.settings,
        "service_info": job.service_info,
        "payload": summarize(job.payload),
        "result": summarize(job.result),
        "backend": job.backend,
        "attempts": job.attempts,
        "last_error": job.last_error,
        "generation_s": job.generation_s,
        "revision": job.revision,
        "queued_at": job.created_at,
        "generating_at": job.started_at,
        "finished_at": job.finished_at,
        "delivered_at": job.delivered_at,
    }
