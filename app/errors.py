"""One error hierarchy. Each error carries the HTTP status it maps to and readable context."""

from __future__ import annotations

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

    def __init__(self, reason: str, *, field_errors: dict[str, Any] | None = None,
                 envelope: dict[str, Any] | None = None) -> None:
        super().__init__(reason, field_errors=field_errors)
        self.envelope = envelope or {}


class NoBackend(DevoidError):
    """No backend is configured for the requested executor type."""

    status = 503


class BackendFailed(DevoidError):
    """A backend call failed: connection refused, timeout, HTTP error or a body that is not an
    image. `retryable` is False when the backend said the request itself is bad (4xx)."""

    status = 502

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.retryable = retryable
