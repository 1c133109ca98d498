"""Dead letters: a copy of a message that cannot be handled, with the reason, in ``mesh.dead``."""

from __future__ import annotations

import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from mesh import topology
from mesh.envelope import H_DEAD_BY, H_QUEUE, H_REASON, H_USER, forwarded
from mesh.transport import Transport

logger = logging.getLogger(__name__)

MAX_REASON = 2000


class DeadLetters:
    """Sends dead letters for one agent instance.

    The copy keeps the body and properties and adds ``x-mesh-reason``; ``user_id`` moves
    to ``x-mesh-user`` because RabbitMQ only lets a connection claim its own user.
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
    ) -> None:
        """Publish the dead letter and wait for the broker's confirm.

        ``headers`` replaces the original's headers, for a caller that must not keep
        some of them (the gateway, whose input is unchecked).
        """
        headers = dict(incoming.headers or {}) if headers is None else dict(headers)
        if incoming.user_id:
            headers[H_USER] = incoming.user_id
        headers[H_REASON] = reason[:MAX_REASON]
        headers[H_QUEUE] = queue
        headers[H_DEAD_BY] = self.agent
        copy = forwarded(incoming, headers, expiring=False)
        await self.transport.publish(
            topology.DEAD_LETTER_EXCHANGE, incoming.routing_key or "", copy
        )
        logger.info("dead-lettered %s from %s: %s", incoming.message_id, queue, reason)
