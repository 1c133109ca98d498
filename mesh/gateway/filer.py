"""The gateway behaviour that files dead letters in the ``mesh.dead`` stream and counts them."""

from __future__ import annotations

import logging
import time

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from mesh import topology
from mesh.behaviour import Behaviour
from mesh.bindings import Binding
from mesh.deadcounts import MESH_REASON, DeadLetterCounts, death_of, describe
from mesh.envelope import H_DEAD_BY_USER, H_FILED_AT, H_QUEUE, H_REASON, forwarded
from mesh.membership import REDIS_DOWN
from mesh.topology import QueueMismatch
from mesh.transport import Unroutable, ack, settle

logger = logging.getLogger(__name__)


class DeadLetterFiler(Behaviour):
    """Moves each dead letter from ``mesh.dead.incoming`` to ``mesh.dead``: filed (confirmed),
    counted, then acked, so none is lost and a crash at worst files one twice.

    Why the detour: see ``topology.declare_dead_letter_incoming``.
    """

    name = "dead_letter_filer"
    kind = "gateway"
    mailbox_size = 256
    max_concurrency = 64

    counts: DeadLetterCounts

    @property
    def consumes(self) -> bool:
        return True

    @property
    def queue_name(self) -> str:
        return topology.DEAD_LETTER_INCOMING

    @property
    def bindings(self) -> list[Binding]:
        return [Binding(topology.DEAD_LETTER_EXCHANGE, "#")]

    async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        return await topology.declare_dead_letter_incoming(channel)

    async def handle_delivery(self, incoming: AbstractIncomingMessage) -> None:
        queue, reason = death_of(incoming)
        headers = dict(incoming.headers or {})
        # Who sent it, as the broker verified it: an agent cannot file a dead letter in
        # another's name (x-mesh-dead-by is its claim; a broker dead letter keeps the
        # original publisher's user).
        headers[H_DEAD_BY_USER] = incoming.user_id or ""
        headers[H_FILED_AT] = round(time.time() * 1000)
        if reason != MESH_REASON:
            # The broker's x-death does not survive a publish: say where and why in the
            # mesh's own headers, as every dead letter an agent sends does.
            headers[H_QUEUE] = queue
            headers[H_REASON] = describe(reason)
        copy = forwarded(incoming, headers, expiring=False)
        transport = self.agent.transport
        key = incoming.routing_key or ""
        try:
            await transport.publish(topology.FILING_EXCHANGE, key, copy, mandatory=True)
        except Unroutable:
            await self._restore_stream()
            await transport.publish(topology.FILING_EXCHANGE, key, copy, mandatory=True)
        try:
            await self.counts.add(queue, reason)
        except REDIS_DOWN as exc:
            # The dead letter itself is safe in the stream; only the count misses it.
            logger.warning("dead letter from %s filed but not counted (Redis: %s)", queue, exc)
        await ack(incoming)

    async def _restore_stream(self) -> None:
        """Declare ``mesh.dead`` where it is missing and bind it to ``mesh.filing``.

        It may exist unbound: declared with other retention than this gateway's settings ask
        (``declare_exchanges`` then keeps it as it is) and its binding never made.  Channels of
        its own: a declare the broker refuses closes its channel.
        """
        transport = self.agent.transport
        settings = self.agent.settings
        channel = await transport.open_channel()
        try:
            stream = await topology.declare_dead_letter_stream(
                channel, settings.dead_letter_max_bytes, settings.dead_letter_max_age
            )
        except QueueMismatch:
            await settle(channel.close())
            channel = await transport.open_channel()
            stream = await channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
        try:
            await stream.bind(topology.FILING_EXCHANGE)
        finally:
            await settle(channel.close())
