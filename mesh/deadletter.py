"""Dead letters: a copy of a message that cannot be handled, with the reason, in ``mesh.dead``.

Agents and the broker send dead letters to ``mesh.dlx``; they wait in ``mesh.dead.incoming``
until a gateway files them in the ``mesh.dead`` stream, where they are read by offset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from mesh import topology
from mesh.envelope import H_DEAD_BY, H_QUEUE, H_REASON, H_USER, forwarded, mesh_id
from mesh.transport import Transport, Unroutable, settle

logger = logging.getLogger(__name__)

MAX_REASON = 2000


class DeadLetters:
    """Sends dead letters for one agent instance.

    The copy keeps the body and properties and adds ``x-mesh-reason``; ``user_id`` moves
    to ``x-mesh-user`` because RabbitMQ only lets a connection claim its own user.  Like
    every copy the mesh forwards it has an AMQP ``message_id`` of its own and carries the
    sender's id in ``x-mesh-id`` (``envelope.forwarded``).
    """

    def __init__(self, transport: Transport, agent: str) -> None:
        self.transport = transport
        self.agent = agent

    async def send(
        self,
        incoming: AbstractIncomingMessage,
        reason: str,
        queue: str,
        *,
        headers: dict[str, Any] | None = None,
        sender_id: str | None = None,
    ) -> None:
        """Publish the dead letter and wait for the broker's confirm.

        ``headers`` replaces the original's headers, for a caller that must not keep
        some of them (the gateway, whose input is unchecked); such a caller also names
        the ``sender_id`` (by default ``envelope.mesh_id(incoming)``).
        """
        headers = dict(incoming.headers or {}) if headers is None else dict(headers)
        if incoming.user_id:
            headers[H_USER] = incoming.user_id
        headers[H_REASON] = reason[:MAX_REASON]
        headers[H_QUEUE] = queue
        headers[H_DEAD_BY] = self.agent
        sender_id = mesh_id(incoming) if sender_id is None else sender_id
        copy = forwarded(incoming, headers, expiring=False, sender_id=sender_id)
        # RabbitMQ refuses a user_id other than the connection's: whoever files the dead
        # letter knows for sure who sent it (x-mesh-dead-by is only claimed).
        copy.user_id = self.transport.user
        key = incoming.routing_key or ""
        # Mandatory: a dead letter the broker confirms into no queue would be gone for good.
        try:
            await self.transport.publish(topology.DEAD_LETTER_EXCHANGE, key, copy, mandatory=True)
        except Unroutable:
            incoming_queue = await topology.declare_dead_letter_incoming(self.transport.channel)
            await incoming_queue.bind(topology.DEAD_LETTER_EXCHANGE, "#")
            await self.transport.publish(topology.DEAD_LETTER_EXCHANGE, key, copy, mandatory=True)
        logger.info("dead-lettered %s from %s: %s", sender_id, queue, reason)


class DeadLetterStream:
    """Reads ``mesh.dead`` from an offset without taking anything out of it.

    ``mesh.dead`` is a stream: every reader sees every dead letter still retained, and
    each delivery names its position in ``x-stream-offset``.  Use as an async context
    manager on a channel of its own (a stream consumer needs the channel's prefetch).
    """

    def __init__(
        self, channel: AbstractChannel, offset: int | str = "first", *, prefetch: int = 100
    ) -> None:
        self.channel = channel
        self.offset = offset
        self.prefetch = prefetch
        self._received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def __aenter__(self) -> DeadLetterStream:
        await self.channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await self.channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
        self._tag = await self._queue.consume(
            self._receive, arguments={"x-stream-offset": self.offset}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._queue is not None and self._tag is not None:
            await settle(self._queue.cancel(self._tag))

    async def _receive(self, incoming: AbstractIncomingMessage) -> None:
        # On a stream an ack only grants credit for more; the dead letter stays.
        await incoming.ack()
        self._received.put_nowait(incoming)

    async def next(self, timeout: float) -> AbstractIncomingMessage:
        """The next dead letter; ``TimeoutError`` if none comes within ``timeout`` seconds."""
        return await asyncio.wait_for(self._received.get(), timeout)


def stream_offset(dead_letter: AbstractIncomingMessage) -> int:
    """A dead letter's position in ``mesh.dead``."""
    offset = (dead_letter.headers or {}).get("x-stream-offset")
    if not isinstance(offset, int):
        raise ValueError(f"message {dead_letter.message_id} was not read from a stream")
    return offset
