"""How a request's row in SQLite becomes a Job: the columns read, where the payload is kept,
and the decoding, made cheap enough to rebuild a queue of 100,000 requests at start-up."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import aiosqlite

from app import json_text
from app.jobs import ExecutorType, GenType, Job, JobStatus

# A request's payload, wherever it is kept (migration 0007).
PAYLOAD_SQL = ("coalesce((SELECT payloads.payload FROM payloads WHERE payloads.object_id = requests.object_id),"
               " requests.payload)")
# Every column but the payload.
HEADER_COLUMNS = ("seq, object_id, service, executor, gen_type, premium, settings, service_info, status,"
                  " attempts, backend, result, created_at, started_at, finished_at, generation_s,"
                  " delivered_at, last_error, revision, channel, interruptions, ack_required, acked_at,"
                  " request_key, cost_units, payload_chars")


@contextlib.contextmanager
def no_cycle_collection() -> Iterator[None]:
    """Building 100,000 jobs would run the cycle collector over the growing heap again and
    again (about half the time of a queue rebuild); nothing built here is cyclic garbage."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Enum members by value: a dict lookup per row instead of an Enum call (queue rebuilds read
# 100,000 rows).
_EXECUTORS = {member.value: member for member in ExecutorType}
_GEN_TYPES = {member.value: member for member in GenType}
_STATUSES = {member.value: member for member in JobStatus}


def _json_object(text: str) -> Any:
    return {} if text == "{}" else json_text.loads(text)


def job_from_row(row: aiosqlite.Row, with_payload: bool = True) -> Job:
    if with_payload:
        payload, payload_chars = json_text.loads(row["payload"]), len(row["payload"])
    else:
        payload, payload_chars = None, row["payload_chars"] or 0
    result = row["result"]
    return Job(
        object_id=row["object_id"], service=row["service"],
        executor=_EXECUTORS[row["executor"]], gen_type=_GEN_TYPES[row["gen_type"]],
        premium=bool(row["premium"]), settings=_json_object(row["settings"]),
        service_info=_json_object(row["service_info"]), payload=payload, payload_chars=payload_chars,
        cost_units=row["cost_units"] or 0.0,
        created_at=row["created_at"], seq=row["seq"], attempts=row["attempts"],
        status=_STATUSES[row["status"]], backend=row["backend"],
        result=json_text.loads(result) if result else None,
        started_at=row["started_at"], finished_at=row["finished_at"], last_error=row["last_error"],
        generation_s=row["generation_s"], delivered_at=row["delivered_at"], revision=row["revision"],
        channel=row["channel"], interruptions=row["interruptions"],
        ack_required=bool(row["ack_required"]), acked_at=row["acked_at"], request_key=row["request_key"],
    )
