"""One error family. Each class carries the HTTP status the API answers with.

Database errors are translated to these in one place (``canvasdb.db.translate``),
by SQLSTATE, never by message text.
"""

from __future__ import annotations

from typing import Any


class CanvasdbError(Exception):
    """Root of every error canvasdb raises on purpose."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = fields


class BadRequest(CanvasdbError):
    status = 400
    title = "Bad request"


class Unauthorized(CanvasdbError):
    status = 401
    title = "Unauthorized"


class Forbidden(CanvasdbError):
    status = 403
    title = "Forbidden"


class NotFound(CanvasdbError):
    status = 404
    title = "Not found"


class Gone(CanvasdbError):
    status = 410
    title = "Gone"


class Conflict(CanvasdbError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(CanvasdbError):
    status = 413
    title = "Payload too large"


class InvalidInput(CanvasdbError):
    """Well-formed but unacceptable input; ``pointer`` names the bad field (RFC 6901)."""

    status = 422
    title = "Invalid input"

    def __init__(self, detail: str, *, pointer: str | None = None, **fields: Any) -> None:
        if pointer is not None:
            fields["pointer"] = pointer
        super().__init__(detail, **fields)


class Unavailable(CanvasdbError):
    status = 503
    title = "Unavailable"


class InsufficientStorage(CanvasdbError):
    """No room left to store something (a full disk, a quota reached): not the request's fault,
    and sending it again helps only once space is freed, so unlike 503 it says nothing of
    when to retry."""

    status = 507
    title = "Insufficient storage"


class MigrationError(CanvasdbError):
    title = "Migration error"


def one_line(exc: BaseException) -> str:
    """An error for a log line or a message: its text on one line, the wrapped error's when it
    wraps one (a procrastinate ConnectorException says only "Database error."), its type's
    name when it has no text."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return " ".join(str(cause).split()) or type(cause).__name__
