"""How a request's row in SQLite becomes a Job: the columns read, where the payload is kept,
and the decoding, made cheap enough to rebuild a queue of 100,000 requests at start-up."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from app.domain import json_text
from app.domain.jobs import ExecutorType, GenType, Job, JobStatus

# What the database holds of a request's payload: all of it, in `requests` or (rows of earlier
# releases, migration 0007) in `payloads`; only its outline when it is in a file (0009).
PAYLOAD_IN_DATABASE_SQL = (
    "coalesce((SELECT payloads.payload FROM payloads WHERE payloads.object_id = requests.object_id), requests.payload)"
)
# A request's payload as stored in the database; NULL when it is in a file (payload_files.py).
PAYLOAD_SQL = f"CASE WHEN requests.payload_file THEN NULL ELSE {PAYLOAD_IN_DATABASE_SQL} END"
# Every column but the payload, in the order job_from_row reads them (by position: reading
# 100,000 rows by column name took as long as fetching them).
HEADER_NAMES = (
    "seq",
    "object_id",
    "service",
    "executor",
    "gen_type",
    "premium",
    "settings",
    "service_info",
    "status",
    "attempts",
    "backend",
    "result",
    "created_at",
    "started_at",
    "finished_at",
    "generation_s",
    "delivered_at",
    "last_error",
    "revision",
    "channel",
    "interruptions",
    "ack_required",
    "acked_at",
    "request_key",
    "cost_units",
    "payload_chars",
    "payload_file",
)
HEADER_COLUMNS = ", ".join(HEADER_NAMES)
OBJECT_ID_INDEX = HEADER_NAMES.index("object_id")
SEQ_INDEX = HEADER_NAMES.index("seq")
PAYLOAD_FILE_INDEX = HEADER_NAMES.index("payload_file")


@contextlib.contextmanager
def no_cycle_collection(*, then_freeze: bool = False) -> Iterator[None]:
    """Building 100,000 jobs would run the cycle collector over the growing heap again and
    again (about half the time of a queue rebuild); nothing built here is cyclic garbage.

    `then_freeze` (start-up only): what is alive at the end (a rebuilt queue, the modules)
    stays alive for long, so it is moved out of the collector's sight (gc.freeze). Otherwise
    the first allocation after re-enabling it would walk all of it in one full pass, and
    later full passes again and again, each stalling the event loop.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if then_freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


# Enum members by value: a dict lookup per row instead of an Enum call (queue rebuilds read
# 100,000 rows).
_EXECUTORS = {member.value: member for member in ExecutorType}
_GEN_TYPES = {member.value: member for member in GenType}
_STATUSES = {member.value: member for member in JobStatus}


def _json_object(text: str) -> Any:
    return {} if text == "{}" else json_text.loads(text)


def job_from_row(row: tuple[Any, ...], with_payload: bool = True) -> Job:
    """A Job from a plain row of HEADER_COLUMNS (then the payload, `with_payload`). A payload
    kept in a file is left None here (the store reads it)."""
    (
        seq,
        object_id,
        service,
        executor,
        gen_type,
        premium,
        settings,
        service_info,
        status,
        attempts,
        backend,
        result,
        created_at,
        started_at,
        finished_at,
        generation_s,
        delivered_at,
        last_error,
        revision,
        channel,
        interruptions,
        ack_required,
        acked_at,
        request_key,
        cost_units,
        payload_chars,
        _payload_file,
    ) = row[:27]
    if with_payload and row[27] is not None:
        payload, payload_chars = json_text.loads(row[27]), len(row[27])
    else:
        payload, payload_chars = None, payload_chars or 0
    return Job(
        object_id=object_id,
        service=service,
        executor=_EXECUTORS[executor],
        gen_type=_GEN_TYPES[gen_type],
        premium=bool(premium),
        settings=_json_object(settings),
        service_info=_json_object(service_info),
        payload=payload,
        payload_chars=payload_chars,
        cost_units=cost_units or 0.0,
        created_at=created_at,
        seq=seq,
        attempts=attempts,
        status=_STATUSES[status],
        backend=backend,
        result=json_text.loads(result) if result else None,
        started_at=started_at,
        finished_at=finished_at,
        last_error=last_error,
        generation_s=generation_s,
        delivered_at=delivered_at,
        revision=revision,
        channel=channel,
        interruptions=interruptions,
        ack_required=bool(ack_required),
        acked_at=acked_at,
        request_key=request_key,
    )
