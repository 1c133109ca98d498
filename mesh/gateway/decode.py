"""Decode stage: the properties every mesh message must carry, consistent with its route."""

from __future__ import annotations

from typing import Any

from mesh import topology
from mesh.envelope import CONTENT_TYPE, H_INSTANCE, H_TOPIC, RESERVED_HEADERS, MessageType
from mesh.gateway.pipeline import Denied, Passage
from mesh.topology import TopicError

_TYPES = frozenset(t.value for t in MessageType)

# The message type each reserved routing-key prefix carries; user topics carry events.
_ROUTE_TYPES: dict[str, frozenset[str]] = {
    "_req": frozenset({MessageType.REQUEST}),
    "_reply": frozenset({MessageType.REPLY, MessageType.ERROR}),
    "_err": frozenset({MessageType.ERROR}),
    "_ctl": frozenset({MessageType.CONTROL}),
    "_registry": frozenset({MessageType.EVENT}),
}
_EVENT = frozenset({MessageType.EVENT})


class Decode:
    """Refuses messages that are not mesh envelopes or whose type does not fit their route.

    Receivers dispatch on the routing key and type; checking them together here means a
    sender cannot dress a control command up as a reply, or a request for one operation
    as another.  The body is left to later stages.
    """

    name = "decode"

    async def __call__(self, passage: Passage) -> None:
        incoming = passage.incoming
        key = passage.routing_key
        if not incoming.message_id:
            raise Denied(self.name, "message has no message_id")
        if not incoming.app_id:
            raise Denied(self.name, "message has no app_id (the sending agent)")
        try:
            topology.check_name("agent id", incoming.app_id)
        except TopicError:
            raise Denied(self.name, "app_id is no agent id (letters, digits, '-', '_')") from None
        if incoming.content_type not in (None, CONTENT_TYPE):
            raise Denied(self.name, f"content type {incoming.content_type!r} is not {CONTENT_TYPE}")
        kind = incoming.type or MessageType.EVENT
        if kind not in _TYPES:
            raise Denied(self.name, f"unknown message type {kind!r}")
        lane = topology.policy_exchange(key)
        if incoming.exchange != lane:
            raise Denied(
                self.name,
                f"routing key {key!r} travels on {lane}, not {incoming.exchange or '(default)'}",
            )
        words = key.split(".")
        allowed = _ROUTE_TYPES.get(words[0]) if key.startswith("_") else _EVENT
        if allowed is None:
            raise Denied(self.name, f"routing key {key!r} uses a reserved prefix")
        if kind not in allowed:
            raise Denied(self.name, f"a {kind} message cannot be sent to {key!r}")
        if key.startswith("_") and len(words) != 3 and not key.startswith("_registry."):
            raise Denied(self.name, f"routing key {key!r} must have three words")
        headers = incoming.headers or {}
        if incoming.reply_to is not None:
            instance = headers.get(H_INSTANCE)
            own = f"_reply.{incoming.app_id}.{instance if isinstance(instance, str) else ''}"
            if incoming.reply_to != own:
                raise Denied(
                    self.name,
                    f"reply_to {incoming.reply_to!r} is not the sender's own reply route {own!r}",
                )
        # Headers only the gateway or the broker may set are dropped, not trusted; the
        # topic receivers see is the key the message was routed by.
        passage.headers = {k: v for k, v in headers.items() if k not in RESERVED_HEADERS}
        name = _not_utf8(passage.headers)
        if name is not None:
            raise Denied(self.name, f"header {name!r} holds a string that is not UTF-8")
        passage.headers[H_TOPIC] = key


def _not_utf8(headers: dict[str, Any]) -> str | None:
    """The first header holding a string that is not UTF-8, at any depth.

    The AMQP client reads such a string as ``bytes``, which it cannot send on: relayed, the
    message would fail after its decision was recorded, and no copy would carry it.
    """
    for name, value in headers.items():
        values = [value]
        while values:
            item = values.pop()
            if isinstance(item, bytes):
                return name
            if isinstance(item, dict):
                values.extend(item.values())
            elif isinstance(item, list):
                values.extend(item)
    return None
