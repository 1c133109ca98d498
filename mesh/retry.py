"""Retries: a message whose handler failed waits in a delay queue, then returns to its queue.

The copy goes to the agent's own retry exchange (never back through ``mesh.policy``, which
would deliver it to every subscriber again) and comes back to the one queue it failed in;
see ``topology.declare_retry_path``.
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage

from mesh import topology
from mesh.envelope import H_ATTEMPT, H_DELIVERY_COUNT, forwarded, mesh_id
from mesh.transport import Transport, Unroutable, settle

logger = logging.getLogger(__name__)


class Retries:
    """Sends retry copies for one agent instance.

    The attempt number travels in ``x-mesh-attempt``: the mesh counts handler failures
    itself, since the broker's delivery count also counts hand-backs and reconnects.
    """

    def __init__(self, transport: Transport, agent: str) -> None:
        self.transport = transport
        self.agent = agent
        self._declared: set[int] = set()

    async def send(
        self, incoming: AbstractIncomingMessage, queue: str, *, attempt: int, delay: float
    ) -> None:
        """Publish the copy that returns to ``queue`` as ``attempt`` after ``delay`` seconds."""
        delay_ms = max(1, round(delay * 1000))
        # The broker's count belongs to the delivery that failed, not to the new copy.
        headers = {k: v for k, v in (incoming.headers or {}).items() if k != H_DELIVERY_COUNT}
        headers[H_ATTEMPT] = attempt
        copy = forwarded(incoming, headers, expiring=False)
        key = topology.retry_key(delay_ms, queue)
        exchange = topology.retry_exchange(self.agent)
        await self._declare(delay_ms)
        try:
            await self.transport.publish(exchange, key, copy, mandatory=True)
        except Unroutable:
            # Someone deleted the delay queue since this instance declared it.
            self._declared.discard(delay_ms)
            await self._declare(delay_ms)
            await self.transport.publish(exchange, key, copy, mandatory=True)
        logger.debug("retry of %s to %s in %d ms", mesh_id(incoming), queue, delay_ms)

    async def _declare(self, delay_ms: int) -> None:
        """Declare the delay queue once per instance (the agent's own: its broker user may)."""
        if delay_ms in self._declared:
            return
        channel = await self.transport.open_channel()
        try:
            await topology.declare_retry_path(channel, self.agent, delay_ms)
        finally:
            await settle(channel.close())
        self._declared.add(delay_ms)
