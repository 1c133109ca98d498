"""What an A2A message asks of a mesh agent: one operation, one payload.

A message names the operation in its metadata (``"operation": "status"``) and carries the
payload as its one part, a data part (any JSON).  Optional metadata: ``"schema":
"status@1"``, the payload's schema version where the policy declares schemas for the
operation (the agent card lists them), and ``"timeout"``, seconds to wait for the reply.
Anything else (no operation, text or file parts, several parts) is refused with a reason.

A data part travels as a protobuf ``Value``, whose numbers are doubles: ``1`` arrives as
``1.0``, so whole numbers are turned back into integers (JSON does not tell them apart), and
integers beyond 2^53 lose precision on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from a2a.types import Message
from google.protobuf.json_format import MessageToDict

from mesh.bridge.errors import ApiError
from mesh.bridge.inputs import MAX_SCHEMA_ID


@dataclass(frozen=True)
class MeshCall:
    """A request to send: ``operation`` with ``payload``, waiting ``timeout`` seconds."""

    operation: str
    payload: Any
    schema: str | None
    timeout: float


def read_call(message: Message | None, *, timeout: float, max_timeout: float) -> MeshCall:
    """The call ``message`` asks for (``timeout`` unless it says); 400 naming what is wrong."""
    if message is None:
        raise ApiError(400, "the request carries no message")
    metadata = MessageToDict(message.metadata)
    operation = metadata.get("operation")
    if not isinstance(operation, str) or not operation:
        raise ApiError(
            400,
            "the message names no operation: set its metadata 'operation' to one of the "
            "agent's skills (its agent card lists them)",
        )
    schema = metadata.get("schema")
    if schema is not None and not (isinstance(schema, str) and 0 < len(schema) <= MAX_SCHEMA_ID):
        raise ApiError(
            400, f"metadata 'schema' must be name@version, 1 to {MAX_SCHEMA_ID} characters"
        )
    wait = metadata.get("timeout", timeout)
    if (
        isinstance(wait, bool)
        or not isinstance(wait, int | float)
        or not math.isfinite(wait)
        or not 0 < wait <= max_timeout
    ):
        raise ApiError(
            400, f"metadata 'timeout' must be seconds, more than 0 and at most {max_timeout:g}"
        )
    kinds = [part.WhichOneof("content") for part in message.parts]
    if kinds != ["data"]:
        shown = ", ".join(str(kind) for kind in kinds) or "none"
        raise ApiError(
            400,
            f"the message must carry the payload as exactly one data part (it has: {shown})",
        )
    payload = _whole(MessageToDict(message.parts[0].data))
    return MeshCall(operation, payload, schema, float(wait))


def _whole(value: Any) -> Any:
    """``value`` with every whole float an int (a ``Value`` keeps numbers as doubles)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value
