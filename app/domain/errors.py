"""One error hierarchy. Each error carries the HTTP status it maps to and readable context."""

from __future__ import annotations

import enum
from typing import Any


class DevoidError(Exception):
    """Base of every error the server answers with on purpose."""

    status = 500

    def __init__(self, reason: str, *, field_errors: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field_errors = field_errors or {}


class InvalidRequest(DevoidError):
    """A client message or payload is malformed. `envelope` holds what could be read of it
    (executor, gen_type, settings, service_info, payload) so the answer can be tied to it."""

    status = 400

    def __init__(
        self, reason: str, *, field_errors: dict[str, Any] | None = None, envelope: dict[str, Any] | None = None
    ) -> None:
        super().__init__(reason, field_errors=field_errors)
        self.envelope = envelope or {}


class NoBackend(DevoidError):
    """No backend is configured for the requested executor type."""

    status = 503


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
