"""Reading what a caller sent: a bounded JSON body, query numbers, names in the path.

Each problem is an ``ApiError`` naming it (400, or 413 for a body over the limit), never a
500.  Bodies are JSON whatever the ``Content-Type`` says (``curl -d`` sends a form type).
"""

from __future__ import annotations

import math
from typing import Any

import pydantic_core
from starlette.requests import HTTPConnection, Request

from mesh import topology
from mesh.bridge.errors import ApiError
from mesh.topology import TopicError

MAX_SCHEMA_ID = 128


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON (an empty body is ``null``); at most ``limit`` bytes are read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return parse_json(bytes(body))


def parse_json(body: bytes | str) -> Any:
    """``body`` as JSON; ``NaN`` and ``Infinity`` are refused (JSON has no such numbers)."""
    if not body or not body.strip():
        return None
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes", limit=limit)


def query_float(
    connection: HTTPConnection, name: str, default: float, *, high: float
) -> float:
    """Query parameter ``name`` as seconds in (0, ``high``], else ``default``."""
    raw = connection.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        problem = f"query parameter {name!r} must be a number, not {raw[:40]!r}"
        raise ApiError(400, problem) from None
    if not math.isfinite(value) or not 0 < value <= high:
        raise ApiError(400, f"query parameter {name!r} must be more than 0 and at most {high:g}")
    return value


def schema_id(connection: HTTPConnection) -> str | None:
    """The ``schema`` query parameter (``reading@2``): the payload's schema version."""
    value = connection.query_params.get("schema")
    if value is not None and not 0 < len(value) <= MAX_SCHEMA_ID:
        raise ApiError(400, f"query parameter 'schema' must be 1 to {MAX_SCHEMA_ID} characters")
    return value


def name(kind: str, value: str) -> str:
    """``value`` if it is a valid agent, operation or behaviour name, else 400."""
    try:
        return topology.check_name(kind, value)
    except TopicError as exc:
        raise ApiError(400, str(exc)) from None


def topic(value: str) -> str:
    """``value`` if a caller may publish to it (no wildcards, no ``_`` first), else 400."""
    try:
        return topology.check_topic(value)
    except TopicError as exc:
        raise ApiError(400, str(exc)) from None


def pattern(value: str) -> str:
    """``value`` if a caller may subscribe to it (words, ``*`` and ``#``), else 400."""
    try:
        return topology.check_pattern(value)
    except TopicError as exc:
        raise ApiError(400, str(exc)) from None


def query_bool(connection: HTTPConnection, name: str, default: bool) -> bool:
    """Query parameter ``name`` as ``true``/``false`` (also ``1``/``0``), else ``default``."""
    raw = connection.query_params.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(400, f"query parameter {name!r} must be true or false, not {raw[:40]!r}")
    return value in ("true", "1")
