"""The domain of one generation request: its enums, its life cycle and its record."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.engine.arrivals import ArrivalMark


class ExecutorType(str, enum.Enum):
    KANDINSKY = "kandinsky"
    AUTOMATIC1111 = "automatic1111"


class GenType(str, enum.Enum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    MIX2IMG = "mix2img"


# What each backend kind can do (docs/protocol.md, "request").
SUPPORTED_GEN_TYPES: dict[ExecutorType, frozenset[GenType]] = {
    ExecutorType.AUTOMATIC1111: frozenset({GenType.TEXT2IMG, GenType.IMG2IMG}),
    ExecutorType.KANDINSKY: frozenset({GenType.TEXT2IMG, GenType.MIX2IMG}),
}


# Payloads this large as JSON (img2img and mix2img images) wait in a file beside the database
# (app/storage/payload_files.py) rather than in memory or in the request's row: a backlog of
# them would otherwise hold every image in RAM. Read back at dispatch.
LARGE_PAYLOAD_CHARS = 64 * 1024


class JobStatus(str, enum.Enum):
    """A request's life: queued -> generating -> ok | error.

    QUEUED      committed and waiting for a backend; also where a GENERATING job returns
                when the server restarts before it finished.
    GENERATING  claimed by one backend (the claim counted an attempt).
    OK / ERROR  final; the result is stored and is delivered (again) until a connection of
                the service has been sent it.
    """

    QUEUED = "queued"
    GENERATING = "generating"
    OK = "ok"
    ERROR = "error"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.OK, JobStatus.ERROR)


# Slotted: every queued request is held as one, and without an attribute dict each takes 0.9
# rather than 2.2 KB (with its small dicts). 100,000 small requests read back at a restart
# peaked at 230-234 MB instead of 362 MB (bench.restart).
@dataclass(slots=True)
class Job:
    """One accepted request as the scheduler and the store see it."""

    object_id: str
    service: str
    executor: ExecutorType
    gen_type: GenType
    premium: bool
    settings: dict[str, Any]
    service_info: dict[str, Any]
    payload: dict[str, Any] | None  # None while a large payload waits in SQLite only
    created_at: float
    seq: int = 0
    attempts: int = 0
    status: JobStatus = JobStatus.QUEUED
    backend: str | None = None
    result: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    generation_s: float | None = None
    delivered_at: float | None = None
    revision: int = 0
    # "ws": answers pushed to a websocket of the service (the one it came on, else another).
    # "http": answers go to its own client only: fetched by GET, or pushed on the private
    # websocket it came on (`?receive=own`) while that is open; never to the service's bots.
    channel: str = "ws"
    interruptions: int = 0  # restarts that cut an attempt short (not counted in attempts)
    ack_required: bool = False  # settings.require_ack: delivered only once acknowledged
    acked_at: float | None = None
    request_key: str | None = None  # service_info.request_id as JSON: the idempotency key
    # Not stored: the connection the request came in on, preferred for its answers, and the
    # scheduler's working state.
    origin: Any = field(default=None, repr=False, compare=False)
    cost_units: float = field(default=0.0, repr=False, compare=False)
    avoid_backends: set[str] = field(default_factory=set, repr=False, compare=False)
    eta_s: float | None = field(default=None, repr=False, compare=False)  # told with `queued`
    # When the client was last told it would be ready (time.monotonic()), and when it was told.
    eta_due: float | None = field(default=None, repr=False, compare=False)
    eta_told_at: float = field(default=0.0, repr=False, compare=False)
    payload_chars: int = field(default=0, repr=False, compare=False)  # size of its JSON
    # Times a later job of its class was taken before it (placement's bounded reordering).
    passed_over: int = field(default=0, repr=False, compare=False)
    # Its place among the arrivals until it starts (app/engine/arrivals.py: who passed it).
    arrival_mark: ArrivalMark | None = field(default=None, repr=False, compare=False)
    # Payload keys its backend does not know (payloads.UnknownFields), told after `queued`.
    unknown_fields: Any = field(default=None, repr=False, compare=False)

    def flag(self, name: str) -> bool:
        """A settings flag (`premium`, `moderate`, `sync_with_s3`), checked at intake to be
        true/false or 0/1."""
        return self.settings.get(name) in (True, 1)

    def envelope(self) -> dict[str, Any]:
        """What an error answer to this request echoes of it, when it was not queued."""
        return {
            "executor": self.executor,
            "gen_type": self.gen_type,
            "settings": self.settings,
            "service_info": self.service_info,
            "payload": self.payload,
        }

    def response_head(self, gen_status: str) -> dict[str, Any]:
        """The fields that open every `response` message about this request, and its MongoDB
        record (the original product's document begins the same way)."""
        return {
            "object_id": self.object_id,
            "service": self.service,
            "message_type": "response",
            "executor": self.executor.value,
            "gen_type": self.gen_type.value,
            "gen_status": gen_status,
        }

    @property
    def has_large_payload(self) -> bool:
        """Whether its payload is one kept in a file while it waits (payload_chars set)."""
        return self.payload_chars >= LARGE_PAYLOAD_CHARS

    @property
    def user_id(self) -> Any:
        """The bot's user (service_info.user_id, required at intake)."""
        return self.service_info.get("user_id")
