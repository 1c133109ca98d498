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
Quorum queues refuse ``queue.delete`` with ``if-empty`` or ``if-unused`` (with a connection
error), so a queue is unbound first and then found empty and unused before it is deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity

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
        wanted = set(bindings) | await self.ledger.recorded(name)
        channel = await self.transport.open_channel(confirms=True)
        try:
            old = await channel.declare_queue(name, passive=True)
            messages, consumers = _counts(old)
            if consumers:
                raise TopologyError(
                    f"queue {name!r} was declared with other arguments ({mismatch.broker_says}) "
                    f"and {consumers} consumer(s) still use it, instances of an earlier "
                    "version: stop them, then start this one again"
                )
            holds_messages = not await _is_empty(old)
            if holds_messages and not self.migrate:
                raise TopologyError(
                    f"queue {name!r} was declared with other arguments ({mismatch.broker_says}) "
                    f"and holds {messages or 'some'} message(s); start this agent once with "
                    "`mesh run ... --migrate-queues` (MESH_MIGRATE_QUEUES=1) to move them into "
                    "a queue declared the new way (nothing is lost)"
                )
            moved = await self._empty(channel, old, wanted) if holds_messages else 0
            # Unbound, then found empty: nothing can arrive between that and the delete.
            await _unbind(old, wanted)
            if not await _is_empty(old):
                for binding in sorted(wanted):  # as it was: the earlier version may go on
                    await old.bind(binding.exchange, binding.routing_key)
                raise TopologyError(
                    f"queue {name!r}: a message arrived while it was being upgraded; start "
                    "again"
                )
            await old.delete(if_unused=False, if_empty=False)
        finally:
            await settle(channel.close())
        logger.warning(
            "queue %s: deleted to declare it anew (%s)%s",
            name,
            mismatch.broker_says,
            f"; its {moved} message(s) wait in {holding_queue(name)}" if moved else "",
        )

    async def _empty(
        self, channel: AbstractChannel, old: AbstractQueue, wanted: set[Binding]
    ) -> int:
        """Move ``old``'s messages to its holding queue, bound as ``old`` was."""
        # Recorded first: ``finish`` unbinds what the record says, even after a crash here.
        await self.ledger.record(holding_queue(old.name), wanted)
        holding = await channel.declare_queue(
            holding_queue(old.name), durable=True, arguments={"x-queue-type": "quorum"}
        )
        for binding in sorted(wanted):
            await holding.bind(binding.exchange, binding.routing_key)
        await _unbind(old, wanted)
        return await _move(channel, old, holding.name)

    async def finish(self, queue: AbstractQueue) -> None:
        """Move what waits in ``queue``'s holding queue back into it, then delete that."""
        channel = await self.transport.open_channel(confirms=True)
        try:
            try:
                holding = await channel.declare_queue(holding_queue(queue.name), passive=True)
            except ChannelNotFoundEntity:
                return  # nothing was held
            await _unbind(holding, await self.ledger.recorded(holding.name))
            moved = await _move(channel, holding, queue.name)
            if await _is_empty(holding):
                await holding.delete(if_unused=False, if_empty=False)
                await self.ledger.forget(holding.name)
        finally:
            await settle(channel.close())
        logger.warning("queue %s: moved %d held message(s) back", queue.name, moved)


def _counts(queue: AbstractQueue) -> tuple[int, int]:
    result = queue.declaration_result
    return result.message_count or 0, result.consumer_count or 0


async def _is_empty(queue: AbstractQueue) -> bool:
    """Whether ``queue`` holds no message, asked with ``basic.get``.

    Not from ``queue.declare``'s count: a quorum queue's count there trails what it holds
    (seen: 0 for a queue holding a message, 3 for one just emptied).
    """
    incoming = await queue.get(no_ack=False, fail=False)
    if incoming is None:
        return True
    await incoming.nack(requeue=True)
    return False


async def _unbind(queue: AbstractQueue, bindings: Iterable[Binding]) -> None:
    for binding in sorted(bindings):
        await queue.unbind(binding.exchange, binding.routing_key)


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
