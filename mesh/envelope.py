"""The mesh envelope: the ``Message`` model and its AMQP form.

AMQP properties carry the metadata; the body is the JSON payload only.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import aio_pika
import pydantic_core
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode
from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/json"

H_TOPIC = "x-mesh-topic"
H_INSTANCE = "x-mesh-instance"
H_BEHAVIOUR = "x-mesh-behaviour"
H_SCHEMA = "x-mesh-schema"
H_TRACEPARENT = "traceparent"
H_AUDIT = "x-mesh-audit"
H_REDACTED = "x-mesh-redacted"
H_USER = "x-mesh-user"
H_REASON = "x-mesh-reason"
H_DELIVERY_COUNT = "x-delivery-count"
H_QUEUE = "x-mesh-queue"
H_DEAD_BY = "x-mesh-dead-by"
H_DEAD_BY_USER = "x-mesh-dead-by-user"
"""The broker user that sent a dead letter, as RabbitMQ verified it (set when it is filed)."""
H_FILED_AT = "x-mesh-filed-at"
"""When the gateway filed a dead letter in ``mesh.dead``, in Unix milliseconds (the stream
itself tells its readers no time)."""
H_ATTEMPT = "x-mesh-attempt"
H_MESH_ID = "x-mesh-id"
"""The sender's message id, on every copy the mesh forwards (see ``forwarded``)."""
H_ON_BEHALF_OF = "x-mesh-on-behalf-of"
"""The token principal a delegating sender (the bridge) acts for; the gateway checks both."""

RESERVED_HEADERS = frozenset(
    {
        H_USER, H_AUDIT, H_REDACTED, H_REASON, H_DELIVERY_COUNT, H_QUEUE, H_DEAD_BY, H_ATTEMPT,
        H_MESH_ID, H_DEAD_BY_USER, H_FILED_AT,
    }
)
"""Set by the gateway or the broker; a sender's values are dropped at the gateway."""

_KNOWN_HEADERS = frozenset(
    {
        H_TOPIC, H_INSTANCE, H_BEHAVIOUR, H_SCHEMA, H_TRACEPARENT, H_AUDIT, H_REDACTED, H_USER,
        H_MESH_ID,
    }
)


class MessageType(StrEnum):
    EVENT = "event"
    REQUEST = "request"
    REPLY = "reply"
    ERROR = "error"
    CONTROL = "control"


class EnvelopeError(ValueError):
    """An AMQP message is not a valid mesh message; the text says why."""


def new_message_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """A message as a behaviour sees it: the envelope's fields and the decoded payload."""

    model_config = ConfigDict(frozen=True)

    topic: str
    payload: Any = None
    type: MessageType = MessageType.EVENT
    message_id: str = Field(default_factory=new_message_id)
    user_id: str | None = None
    """The sender's broker user as verified by RabbitMQ (forwarded by the gateway)."""
    app_id: str | None = None
    """The sending agent's id."""
    instance: str | None = None
    behaviour: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: datetime | None = None
    expiration: float | None = None
    """Time to live in seconds."""
    schema_id: str | None = None
    traceparent: str | None = None
    audit_id: str | None = None
    redacted: tuple[str, ...] = ()
    headers: dict[str, Any] = Field(default_factory=dict)
    """Headers other than the mesh's own."""
    delivery_count: int = 0
    """How many times the broker delivered this message before (0 on the first delivery);
    hand-backs on stop and reconnects count too, so it is no measure of failures."""
    attempt: int = 1
    """Which attempt at handling this message this is: 1, then one more per handler failure."""


def error_of(payload: Any) -> tuple[str, str]:
    """An error message's body, ``{"error": text, "type": name}``, as ``(name, text)``."""
    body = payload if isinstance(payload, dict) else {}
    return str(body.get("type", "Error")), str(body.get("error", payload))


def encode_body(payload: Any) -> bytes:
    """JSON-encode a payload: a pydantic model, or anything JSON can hold."""
    try:
        return pydantic_core.to_json(payload)
    except pydantic_core.PydanticSerializationError as exc:
        raise EnvelopeError(f"payload is not JSON-serialisable: {exc}") from None


def to_amqp(
    message: Message,
    *,
    body: bytes | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """The AMQP message for ``message``; ``user_id`` is the connection's broker user."""
    headers: dict[str, Any] = dict(message.headers)
    headers[H_TOPIC] = message.topic
    if message.instance:
        headers[H_INSTANCE] = message.instance
    if message.behaviour:
        headers[H_BEHAVIOUR] = message.behaviour
    if message.schema_id:
        headers[H_SCHEMA] = message.schema_id
    if message.traceparent:
        headers[H_TRACEPARENT] = message.traceparent
    return aio_pika.Message(
        body if body is not None else encode_body(message.payload),
        headers=headers,
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        user_id=user_id,
        app_id=message.app_id,
        type=message.type.value,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp or datetime.now(UTC),
        expiration=message.expiration,
    )


def mesh_id(incoming: AbstractIncomingMessage) -> str:
    """The mesh's id of a delivered message: the sender's message id.

    That is ``x-mesh-id`` on a copy the mesh forwarded, else the AMQP ``message_id`` (a
    message as its sender published it).  Only for messages the gateway has relayed: on
    the gateway's own input ``x-mesh-id`` is whatever the sender wrote, and the sender's
    id is its ``message_id``.
    """
    value = _text((incoming.headers or {}).get(H_MESH_ID))
    return value or incoming.message_id or ""


def forwarded(
    incoming: AbstractIncomingMessage,
    headers: dict[str, Any],
    *,
    expiring: bool = True,
    sender_id: str | None = None,
    body: bytes | None = None,
) -> aio_pika.Message:
    """A copy of a delivered message with ``headers``, to publish on.

    The copy has no ``user_id``: RabbitMQ only lets a connection claim its own user, so
    the verified sender travels in ``x-mesh-user``.  ``expiring=False`` drops the TTL
    (a dead letter must stay until someone reads it).

    The copy gets an AMQP ``message_id`` of its own: aiormq matches a returned message
    to its publish by ``message_id`` (Channel._on_return_frame), so two messages in
    flight with one id (a sender may reuse ids; a message and its dead letter or retry
    share one) could take each other's return.  The sender's id travels in
    ``x-mesh-id``, which ``from_amqp`` reads back as ``Message.message_id``: ``sender_id``,
    by default ``mesh_id(incoming)``; the gateway passes the sender's ``message_id``.
    ``body`` replaces the delivered body (the gateway's redaction).
    """
    headers = dict(headers)
    original = mesh_id(incoming) if sender_id is None else sender_id
    if original:
        headers[H_MESH_ID] = original
    else:
        headers.pop(H_MESH_ID, None)
    return aio_pika.Message(
        incoming.body if body is None else body,
        headers=headers,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        expiration=incoming.expiration if expiring else None,
        message_id=new_message_id(),
        timestamp=incoming.timestamp,
        type=incoming.type,
        app_id=incoming.app_id,
    )


def from_amqp(incoming: AbstractIncomingMessage) -> Message:
    """Decode a delivered AMQP message; raise ``EnvelopeError`` naming what is wrong."""
    if incoming.content_type not in (None, CONTENT_TYPE):
        raise EnvelopeError(f"content type {incoming.content_type!r} is not {CONTENT_TYPE!r}")
    try:
        payload = pydantic_core.from_json(incoming.body) if incoming.body else None
    except ValueError as exc:
        raise EnvelopeError(f"body is not JSON: {exc}") from None
    raw_headers = incoming.headers or {}
    headers = {k: v for k, v in raw_headers.items() if k not in _KNOWN_HEADERS}
    delivery_count = headers.pop(H_DELIVERY_COUNT, 0)
    attempt = headers.pop(H_ATTEMPT, 1)
    try:
        kind = MessageType(incoming.type or MessageType.EVENT)
    except ValueError:
        raise EnvelopeError(f"unknown message type {incoming.type!r}") from None
    redacted = raw_headers.get(H_REDACTED) or ()
    expiration = incoming.expiration
    return Message(
        topic=_text(raw_headers.get(H_TOPIC)) or incoming.routing_key or "",
        payload=payload,
        type=kind,
        message_id=mesh_id(incoming),
        user_id=_text(raw_headers.get(H_USER)),
        app_id=incoming.app_id,
        instance=_text(raw_headers.get(H_INSTANCE)),
        behaviour=_text(raw_headers.get(H_BEHAVIOUR)),
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        timestamp=incoming.timestamp,
        expiration=_seconds(expiration),
        schema_id=_text(raw_headers.get(H_SCHEMA)),
        traceparent=_text(raw_headers.get(H_TRACEPARENT)),
        audit_id=_text(raw_headers.get(H_AUDIT)),
        redacted=tuple(_text(f) or "" for f in redacted)
        if isinstance(redacted, list | tuple)
        else (),
        headers=headers,
        delivery_count=int(delivery_count) if isinstance(delivery_count, int) else 0,
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
    )


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    # AMQP long strings arrive as bytes from some clients.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
