"""The bridge's errors: every refusal is JSON ``{"error": text, "type": kind, ...}``.

Handlers turn ``ApiError`` (raised by the bridge's own checks), Starlette's
``HTTPException`` (no such route, a method a route lacks) and, as a last resort, anything
else into that shape, so a client never gets an HTML page or an empty body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

KINDS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    422: "SchemaViolation",
    429: "TooManyRequests",
    500: "Internal",
    502: "RemoteError",
    503: "Unavailable",
    504: "Timeout",
}
"""The ``type`` of an error body by status, unless the error names its own."""


class ApiError(Exception):
    """A refusal with its HTTP status; ``extra`` fields join the JSON body."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.kind = kind or KINDS.get(status, "Error")
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "type": self.kind, **self.extra}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        text = f"no such resource: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        text = f"{request.method} is not allowed on {request.url.path}"
    else:
        text = str(exc.detail)
    return error_response(ApiError(exc.status_code, text, headers=exc.headers))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """What no check foresaw: a bug, logged with its traceback, answered without details."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "the bridge failed to handle this request (logged)"))
