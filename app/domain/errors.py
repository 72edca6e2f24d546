"""One error hierarchy. Each error carries the HTTP status it maps to and readable context."""

from __future__ import annotations

import enum
from typing import Any


class Refusal(str, enum.Enum):
    """Why a request was not queued: a stable, machine-readable `code` sent beside the readable
    message (docs/protocol.md lists them). Each has the HTTP status the API answers with."""

    INVALID_REQUEST = "invalid_request"  # malformed message or payload
    MESSAGE_TOO_LARGE = "message_too_large"  # over MAX_MESSAGE_BYTES
    NO_BACKEND = "no_backend"  # no backend of its executor type is configured
    SHUTTING_DOWN = "shutting_down"  # arrived while the server stops
    NOT_STORED = "not_stored"  # the database refused the commit
    RATE_LIMITED = "rate_limited"  # the service sent faster than SERVICE_RATE_PER_S allows
    USER_QUEUE_FULL = "user_queue_full"  # the user has MAX_USER_REQUESTS queued or running
    SERVICE_QUEUE_FULL = "service_queue_full"  # the service has MAX_SERVICE_REQUESTS queued or running
    PREMIUM_NOT_ALLOWED = "premium_not_allowed"  # premium from a service not in PREMIUM_SERVICES
    JOB_TOO_LARGE = "job_too_large"  # more cost units than MAX_JOB_UNITS
    MODERATED = "moderated"  # moderation refused its text (settings.moderate)

    @property
    def status(self) -> int:
        return _REFUSAL_STATUS.get(self, 400)


_REFUSAL_STATUS = {
    Refusal.MESSAGE_TOO_LARGE: 413,
    Refusal.JOB_TOO_LARGE: 413,
    Refusal.NO_BACKEND: 503,
    Refusal.SHUTTING_DOWN: 503,
    Refusal.NOT_STORED: 500,
    Refusal.RATE_LIMITED: 429,
    Refusal.USER_QUEUE_FULL: 429,
    Refusal.SERVICE_QUEUE_FULL: 429,
    Refusal.PREMIUM_NOT_ALLOWED: 403,
    Refusal.MODERATED: 403,
}


class DevoidError(Exception):
    """Base of every error the server answers with on purpose."""

    status = 500
    code: str | None = None
    retry_after_s: float | None = None

    def __init__(self, reason: str, *, field_errors: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field_errors = field_errors or {}


class InvalidRequest(DevoidError):
    """A request that is not queued: malformed (the default), or refused for the reason its
    `refusal` names. `envelope` holds what could be read of it (executor, gen_type, settings,
    service_info, payload) so the answer can be tied to it."""

    def __init__(
        self,
        reason: str,
        *,
        field_errors: dict[str, Any] | None = None,
        envelope: dict[str, Any] | None = None,
        refusal: Refusal = Refusal.INVALID_REQUEST,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason, field_errors=field_errors)
        self.envelope = envelope or {}
        self.refusal = refusal
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:  # type: ignore[override]
        return self.refusal.status

    @property
    def code(self) -> str:  # type: ignore[override]
        return self.refusal.value


class FailureKind(str, enum.Enum):
    """How a backend call failed."""

    REFUSED = "refused"  # the connection failed (down, wrong address, tunnel gone)
    TIMEOUT = "timeout"  # no answer within the job's timeout
    SERVER = "server"  # HTTP 5xx
    MALFORMED = "malformed"  # a 2xx whose body is not the image it should be
    REJECTED = "rejected"  # HTTP 4xx: the request itself is bad; not the backend's fault, not retried


class BackendFailed(DevoidError):
    """A backend call failed; `kind` says how (FailureKind)."""

    status = 502

    def __init__(self, reason: str, *, kind: FailureKind = FailureKind.SERVER) -> None:
        super().__init__(reason)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind is not FailureKind.REJECTED

    @property
    def backend_is_down(self) -> bool:
        """Failures that say the backend is gone rather than having a bad moment."""
        return self.kind in (FailureKind.REFUSED, FailureKind.TIMEOUT)
