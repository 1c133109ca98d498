"""Upgrading a queue that an earlier version declared with other arguments, losing nothing.

RabbitMQ cannot change a queue's arguments: the queue must be deleted and declared again.
An empty, unused queue is re-created on the spot.  A queue holding messages is left alone
unless the user asks for a migration (``mesh run --migrate-queues``); then its messages
wait in a holding queue, bound like it, while it is declared again, and move back after:

1. declare ``<queue>.upgrading`` and bind it as the queue is bound, then unbind the queue;
2. move the queue's messages into it (publish confirmed, then ack) and delete the queue;
3. the caller declares the queue the new way and binds it (``Behaviour.declare_queue``);
4. unbind the holding queue, move its messages back, delete it (``finish``).

Each move is confirmed before the original is acked, so a crash duplicates rather than
loses; starting again with ``--migrate-queues`` picks up a holding queue left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from mesh.bindings import Binding, BindingLedger
from mesh.envelope import forwarded
from mesh.topology import QueueMismatch, TopologyError
from mesh.transport import Transport, settle

logger = logging.getLogger(__name__)

HOLDING_SUFFIX = ".upgrading"


def holding_queue(queue: str) -> str:
    """Where ``queue``'s messages wait while it is declared again."""
    return f"{queue}{HOLDING_SUFFIX}"


class QueueUpgrade:
    """Makes way for a queue declared the new way (see the module's docstring)."""

    def __init__(self, transport: Transport, ledger: BindingLedger, *, migrate: bool) -> None:
        self.transport = transport
        self.ledger = ledger
        self.migrate = migrate

    async def clear(self, mismatch: QueueMismatch, bindings: Iterable[Binding]) -> None:
        """Delete the mismatched queue: at once if empty, else after moving its messages out.

        Raises ``TopologyError`` naming what to do when that is not possible now.
        """
        name = mismatch.name
        if await self._delete_if_empty(name):
            logger.warning("queue %s was empty: re-creating it (%s)", name, mismatch.broker_says)
            return
        messages, consumers = await self._depth(name)
        if consumers:
            raise TopologyError(
                f"queue {name!r} was declared with other arguments ({mismatch.broker_says}) and "
                f"{consumers} consumer(s) still use it, instances of an earlier version: stop "
                "them, then start this one again"
            )
        if not self.migrate:
            raise TopologyError(
                f"queue {name!r} was declared with other arguments ({mismatch.broker_says}) and "
                f"holds {messages} message(s); start this agent once with "
                "`mesh run ... --migrate-queues` (MESH_MIGRATE_QUEUES=1) to move them into a "
                "queue declared the new way (nothing is lost)"
            )
        wanted = set(bindings) | await self.ledger.recorded(name)
        # Recorded first: ``finish`` unbinds what the record says, even after a crash here.
        await self.ledger.record(holding_queue(name), wanted)
        channel = await self.transport.open_channel(confirms=True)
        try:
            holding = await channel.declare_queue(
                holding_queue(name), durable=True, arguments={"x-queue-type": "quorum"}
            )
            old = await channel.declare_queue(name, passive=True)
            for binding in sorted(wanted):
                await holding.bind(binding.exchange, binding.routing_key)
            for binding in sorted(wanted):
                await old.unbind(binding.exchange, binding.routing_key)
            moved = await _move(channel, old, holding.name)
            await old.delete(if_unused=True, if_empty=True)
        finally:
            await settle(channel.close())
        logger.warning(
            "queue %s: moved %d message(s) to %s to declare it again (%s)",
            name,
            moved,
            holding.name,
            mismatch.broker_says,
        )

    async def finish(self, queue: AbstractQueue) -> None:
        """Move what waits in ``queue``'s holding queue back into it, then delete that."""
        channel = await self.transport.open_channel(confirms=True)
        try:
            try:
                holding = await channel.declare_queue(holding_queue(queue.name), passive=True)
            except ChannelNotFoundEntity:
                return  # nothing was held
            for binding in sorted(await self.ledger.recorded(holding.name)):
                await holding.unbind(binding.exchange, binding.routing_key)
            moved = await _move(channel, holding, queue.name)
            await holding.delete(if_unused=True, if_empty=True)
            await self.ledger.forget(holding.name)
        finally:
            await settle(channel.close())
        logger.warning("queue %s: moved %d held message(s) back", queue.name, moved)

    async def _delete_if_empty(self, name: str) -> bool:
        channel = await self.transport.open_channel(confirms=False)
        try:
            queue = await channel.declare_queue(name, passive=True)
            await queue.delete(if_unused=True, if_empty=True)
        except (ChannelPreconditionFailed, ChannelNotFoundEntity):
            return False  # not empty or in use (or gone meanwhile: declaring will tell)
        finally:
            await settle(channel.close())
        return True

    async def _depth(self, name: str) -> tuple[int, int]:
        channel = await self.transport.open_channel(confirms=False)
        try:
            result = (await channel.declare_queue(name, passive=True)).declaration_result
        finally:
            await settle(channel.close())
        return result.message_count or 0, result.consumer_count or 0


async def _move(channel: AbstractChannel, source: AbstractQueue, target: str) -> int:
    """Move every message of ``source`` to the queue ``target``: confirmed, then acked."""
    moved = 0
    while True:
        incoming = await source.get(no_ack=False, fail=False)
        if incoming is None:
            return moved
        copy = forwarded(incoming, dict(incoming.headers or {}))
        await channel.default_exchange.publish(copy, routing_key=target)
        await incoming.ack()
        moved += 1
