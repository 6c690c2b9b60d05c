"""The server's errors and their JSON: every failure answers ``{"error": kind, "field": name, "detail": message}``.

- 422: bad input, a :class:`~ldm.errors.UserError` (the same checks as the command line), naming the field;
- 401: missing or wrong credentials; 404: an unknown model, LoRA or path; 413: a body over the size limit;
- 429: the queue is full (with ``Retry-After``); 500: a failure inside generation (the server keeps serving).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ldm.errors import UserError


class FieldError(UserError):
    """Bad input in one request field (``field``, None where no single field is at fault); the message names it."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        super().__init__(message)


class QueueFull(Exception):  # noqa: N818 - a state, answered with 429
    """The job queue holds its limit of waiting jobs."""


class JobCancelled(Exception):  # noqa: N818 - a signal raised from the sampler callback
    """The client of a running job went away: its work stops at the next sampler step."""


def error_response(status: int, kind: str, detail: str, field: str | None = None, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return JSONResponse({"error": kind, "field": field, "detail": detail, **extra}, status_code=status, headers=headers)
