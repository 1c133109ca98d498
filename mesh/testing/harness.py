"""MeshHarness: what a test of one's agents does on the mesh (start them, publish, call, watch).

Nameko's ``container_factory`` and FastStream's ``TestRabbitBroker`` stand in for the broker;
this runs the agents on the real one, so a test sees what production would: the gateway's
checks, the queues' bindings, the JSON on the wire.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from mesh import topology
from mesh.agent import Agent
from mesh.client import Client
from mesh.config import Settings
from mesh.envelope import Message, from_amqp
from mesh.management import vhost_of

WAIT = 5.0
"""Seconds ``Subscription.next`` waits by default."""


class Subscription:
    """Copies of what the mesh delivers on one pattern from the moment it was made, in order."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    @classmethod
    async def open(cls, channel: AbstractChannel, pattern: str) -> Subscription:
        """Bind a private queue to the exchange that delivers ``pattern`` and consume it."""
        subscription = cls(topology.check_binding(pattern))
        exchange = topology.delivery_exchange(pattern)
        # Declared (as the mesh declares it) so that a subscription made before any agent
        # started does not fail for want of the exchange.
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, pattern)
        await queue.consume(subscription._deliver, no_ack=True)
        return subscription

    async def _deliver(self, incoming: AbstractIncomingMessage) -> None:
        self._received.put_nowait(incoming)

    async def next(self, timeout: float = WAIT) -> Message:
        """The next message; ``AssertionError`` when none comes within ``timeout`` seconds."""
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        try:
            async with asyncio.timeout(timeout):
                incoming = await self._received.get()
        except TimeoutError:
            raise AssertionError(f"no message on {self.pattern!r} within {timeout:g}s") from None
        return from_amqp(incoming)


class MeshHarness:
    """Starts a test's agents on the test's settings and watches what the mesh delivers.

    Messages reach subscribers only through a gateway, so run one next to it (the
    ``mesh_harness`` fixture does).  ``aclose`` stops the agents, last started first.
    """

    def __init__(self, settings: Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self._stack = AsyncExitStack()
        self._channel: AbstractChannel | None = None

    async def start(self, *agents: Agent) -> None:
        """Start ``agents`` in order."""
        for agent in agents:
            if (agent.settings.amqp_url, agent.settings.namespace) != (
                self.settings.amqp_url,
                self.settings.namespace,
            ):
                # An agent built without settings= reads MESH_AMQP_URL: the shared vhost.
                raise ValueError(
                    f"{agent!r} is on vhost {vhost_of(agent.settings)!r} and namespace "
                    f"{agent.settings.namespace!r}, not the test's {vhost_of(self.settings)!r} "
                    f"and {self.settings.namespace!r}: build it with settings=<the test's settings>"
                )
        for agent in agents:
            await self._stack.enter_async_context(agent)

    async def subscribe(self, pattern: str) -> Subscription:
        """What the mesh delivers on ``pattern`` from now on.

        Subscribe before causing the message: one delivered earlier is not seen.  A pattern
        starting with ``_`` watches the mesh's own lane (``_registry.join``, say).
        """
        if self._channel is None:
            connection: AbstractConnection = await aio_pika.connect(self.settings.amqp_url)
            self._stack.push_async_callback(connection.close)
            self._channel = await connection.channel()
        return await Subscription.open(self._channel, pattern)

    async def publish(self, topic: str, payload: Any = None) -> str:
        """Publish as the test's client; the message id, once the broker confirmed it."""
        return await self.client.publish(topic, payload)

    async def call(
        self, agent: str, operation: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Call ``operation`` on ``agent``; its reply (``RemoteError`` when it failed)."""
        return await self.client.request(agent, operation, payload, timeout=timeout)

    async def aclose(self) -> None:
        """Stop the agents (last started first) and close the subscriptions."""
        await self._stack.aclose()
