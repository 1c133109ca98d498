"""Decode stage: the properties every mesh message must carry."""

from __future__ import annotations

from mesh.envelope import CONTENT_TYPE, RESERVED_HEADERS, MessageType
from mesh.gateway.pipeline import Denied, Passage

_TYPES = frozenset(t.value for t in MessageType)


class Decode:
    """Refuses messages that are not mesh envelopes (the body is checked by later stages)."""

    name = "decode"

    async def __call__(self, passage: Passage) -> None:
        incoming = passage.incoming
        if not incoming.message_id:
            raise Denied(self.name, "message has no message_id")
        if incoming.content_type not in (None, CONTENT_TYPE):
            raise Denied(self.name, f"content type {incoming.content_type!r} is not {CONTENT_TYPE}")
        if incoming.type is not None and incoming.type not in _TYPES:
            raise Denied(self.name, f"unknown message type {incoming.type!r}")
        # Headers that only the gateway or the broker may set are dropped, not trusted.
        passage.headers = {
            k: v for k, v in (incoming.headers or {}).items() if k not in RESERVED_HEADERS
        }
