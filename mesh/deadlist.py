"""The dead letters in ``mesh.dead`` as records, read by offset up to the stream's end.

A dead letter's id is its offset in the stream: a number the broker gives it when it is
filed, never reused and never changed (retention drops the oldest, the rest keep theirs),
short enough to type.  The sender's message id (``x-mesh-id``) is no id of a dead letter:
one message may die several times (redriven and failing again), and a forged dead letter
may name any.

A stream never says where it ends, and RabbitMQ 3.10 tells an AMQP client neither its length
nor its last offset (the management API's count trails by its statistics interval, and
``queue.declare`` answers 0).  Writing a marker to find the end would take a permission that
lets its holder forge dead letters, so the end is learned the one way left: a consumer at
``last`` gets the newest chunk at once, in one burst, and the highest offset in it, once
nothing more comes for a moment, is the end.  Reading from the start then stops exactly
there, however slowly the rest arrives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from mesh.deadcounts import death_of, describe
from mesh.deadletter import DeadLetterStream, stream_offset
from mesh.envelope import (
    H_DEAD_BY,
    H_DEAD_BY_USER,
    H_FILED_AT,
    H_INSTANCE,
    H_MESH_ID,
    H_REASON,
    H_TOPIC,
    H_USER,
)

EMPTY_WAIT = 1.0
"""Seconds a consumer at ``last`` waits for its first dead letter before the stream counts as
empty."""
CHUNK_GAP = 0.3
"""Seconds with nothing more after the newest chunk began: it has all arrived (a chunk comes
in one burst, milliseconds long)."""
PROBE_LIMIT = 5.0
"""Seconds the end is looked for at most, while dead letters keep arriving."""
STALL = 30.0
"""Seconds without a delivery, before the known end, after which reading gives up."""
PREFETCH = 1000

_OFFSET = "x-stream-offset"


class DeadLetterReadError(RuntimeError):
    """``mesh.dead`` could not be read to the end."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as ``mesh.dead`` holds it: the message that died, and the headers the
    mesh added saying where, why and who sent it there."""

    offset: int
    incoming: AbstractIncomingMessage = field(repr=False, compare=False)

    @classmethod
    def of(cls, incoming: AbstractIncomingMessage) -> DeadLetter:
        return cls(stream_offset(incoming), incoming)

    @property
    def headers(self) -> dict[str, Any]:
        """The dead letter's headers (the stream's own offset left out)."""
        return {k: v for k, v in (self.incoming.headers or {}).items() if k != _OFFSET}

    def _header(self, name: str) -> str | None:
        return _text(self.headers.get(name))

    @property
    def queue(self) -> str:
        """The queue it died in."""
        return death_of(self.incoming)[0]

    @property
    def reason(self) -> str:
        reason = self._header(H_REASON)
        return reason if reason is not None else describe(death_of(self.incoming)[1])

    @property
    def topic(self) -> str:
        return self._header(H_TOPIC) or self.incoming.routing_key or ""

    @property
    def message_id(self) -> str:
        """The sender's message id."""
        return self._header(H_MESH_ID) or self.incoming.message_id or ""

    @property
    def type(self) -> str:
        return self.incoming.type or "event"

    @property
    def sender(self) -> str | None:
        """The agent that sent the message (``app_id``)."""
        return self.incoming.app_id

    @property
    def sender_instance(self) -> str | None:
        return self._header(H_INSTANCE)

    @property
    def sender_user(self) -> str | None:
        """The sender's broker user, as the gateway verified it (``x-mesh-user``)."""
        return self._header(H_USER)

    @property
    def dead_by(self) -> str | None:
        """The agent that says it dead-lettered the message (``x-mesh-dead-by``, a claim)."""
        return self._header(H_DEAD_BY)

    @property
    def dead_by_user(self) -> str | None:
        """The broker user that put it in ``mesh.dlx``, as RabbitMQ verified it; ``None``
        when nothing verified one (the broker's own dead letters, or a publish without a
        ``user_id``)."""
        return self._header(H_DEAD_BY_USER) or None

    @property
    def filed_at(self) -> datetime | None:
        """When a gateway filed it in ``mesh.dead``."""
        value = self.headers.get(H_FILED_AT)
        return datetime.fromtimestamp(value / 1000, UTC) if isinstance(value, int) else None

    @property
    def sent_at(self) -> datetime | None:
        """When its sender sent the message."""
        return self.incoming.timestamp

    def payload(self) -> Any:
        """The body as JSON, else as text."""
        text = self.incoming.body.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def summary(self) -> dict[str, Any]:
        """What ``mesh dead list --json`` prints for it."""
        return {
            "id": self.offset,
            "filed_at": _iso(self.filed_at),
            "sent_at": _iso(self.sent_at),
            "queue": self.queue,
            "topic": self.topic,
            "type": self.type,
            "reason": self.reason,
            "message_id": self.message_id,
            "sender": self.sender,
            "sender_instance": self.sender_instance,
            "sender_user": self.sender_user,
            "dead_by": self.dead_by,
            "dead_by_user": self.dead_by_user,
        }

    def details(self) -> dict[str, Any]:
        """The whole dead letter, for ``mesh dead show``: headers, properties, payload."""
        incoming = self.incoming
        properties = {
            "message_id": incoming.message_id,
            "app_id": incoming.app_id,
            "type": incoming.type,
            "timestamp": _iso(incoming.timestamp),
            "correlation_id": incoming.correlation_id,
            "reply_to": incoming.reply_to,
            "content_type": incoming.content_type,
            "content_encoding": incoming.content_encoding,
            "routing_key": incoming.routing_key,
        }
        return self.summary() | {
            "size": len(incoming.body),
            "properties": properties,
            "headers": jsonable(self.headers),
            "payload": self.payload(),
        }


async def stream_end(channel: AbstractChannel) -> int | None:
    """The offset of the newest dead letter in ``mesh.dead`` now; ``None`` if it is empty.

    Takes ``EMPTY_WAIT`` seconds on an empty stream, ``CHUNK_GAP`` more than the newest chunk
    otherwise (see the module's docstring).
    """
    end: int | None = None
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PROBE_LIMIT
    async with DeadLetterStream(channel, "last", prefetch=PREFETCH) as newest:
        wait = EMPTY_WAIT
        while loop.time() < give_up:
            try:
                offset = stream_offset(await newest.next(wait))
            except TimeoutError:
                break
            end = offset if end is None else max(end, offset)
            wait = CHUNK_GAP
    return end


async def read_dead_letters(
    channel: AbstractChannel, end: int, start: int = 0
) -> AsyncIterator[DeadLetter]:
    """The dead letters from offset ``start`` (or the oldest kept, if that is later) through
    ``end``, oldest first.  Raises ``DeadLetterReadError`` if the stream stalls before ``end``."""
    if start > end:
        return
    async with DeadLetterStream(channel, start, prefetch=PREFETCH) as stream:
        while True:
            try:
                dead = DeadLetter.of(await stream.next(STALL))
            except TimeoutError:
                raise DeadLetterReadError(
                    f"mesh.dead sent nothing for {STALL:g}s before offset {end}"
                ) from None
            if dead.offset > end:
                return
            yield dead
            if dead.offset == end:
                return


def jsonable(value: Any) -> Any:
    """``value`` (header values: bytes, datetimes, nested tables) as JSON can hold it."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return _iso(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
