"""The AMQP transport: one robust connection, a confirming publisher, consumer channels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
)
from aiormq.abc import DeliveredMessage

from mesh.config import Settings

logger = logging.getLogger(__name__)

# Failures after which the message may not have reached the broker but the connection
# will come back: wait for the robust connection, then publish again.
_RETRYABLE = (AMQPConnectionError, ChannelInvalidStateError, ConnectionError)


async def settle(operation: Awaitable[Any]) -> None:
    """Run an ack, nack, reject or close that may fail because the channel died.

    When it does, the broker has already returned the message to its queue.
    """
    try:
        await operation
    except Exception as exc:
        logger.debug("could not settle message (%r); the broker will redeliver it", exc)


def is_stale(incoming: AbstractIncomingMessage) -> bool:
    """Whether ``incoming`` came on a channel that has since closed (so it was requeued)."""
    try:
        return incoming.channel.is_closed
    except ChannelInvalidStateError:
        return True


class BrokerUnavailable(ConnectionError):
    """RabbitMQ could not be reached when connecting."""


class PublishError(RuntimeError):
    """The broker did not confirm a message; it may or may not have been delivered."""


class Unroutable(PublishError):
    """A mandatory message matched no queue."""


class Transport:
    """A robust AMQP connection shared by everything in one agent instance.

    Publishing goes through one channel in confirm mode: ``publish`` returns only after
    the broker confirmed the message, and retries across reconnections until
    ``settings.publish_timeout``.  Consumers get a channel each so that each has its
    own prefetch window.
    """

    def __init__(self, settings: Settings, connection_name: str) -> None:
        self.settings = settings
        self.connection_name = connection_name
        self.user = unquote(urlsplit(settings.amqp_url).username or "guest")
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("transport is not connected")
        return self._connection

    @property
    def channel(self) -> AbstractRobustChannel:
        """The publishing channel (confirm mode); also used for declarations."""
        if self._channel is None:
            raise RuntimeError("transport is not connected")
        return self._channel

    async def connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(
                self.settings.amqp_url,
                client_properties={"connection_name": self.connection_name},
            )
        except (AMQPConnectionError, OSError) as exc:
            url = urlsplit(self.settings.amqp_url)  # named without the password
            raise BrokerUnavailable(
                f"RabbitMQ unreachable at {url.hostname}:{url.port or 5672}{url.path or '/'} "
                f"({exc}); start it or point MESH_AMQP_URL at it"
            ) from None
        self._channel = await self.open_channel()

    async def open_channel(
        self, prefetch: int | None = None, *, confirms: bool = True
    ) -> AbstractRobustChannel:
        channel = await self.connection.channel(publisher_confirms=confirms)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channel = None
        self._exchanges.clear()

    async def exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self.channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.abc.AbstractMessage,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm; raise ``PublishError`` otherwise."""
        target = await self.exchange(exchange)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        while True:
            remaining = deadline - loop.time()
            try:
                result = await target.publish(
                    message, routing_key, mandatory=mandatory, timeout=remaining
                )
            except (DeliveryError, ChannelClosed) as exc:
                # A refusal (no permission, no such exchange …) will not change on retry.
                raise PublishError(
                    f"broker refused message to {exchange}/{routing_key}: {exc}"
                ) from exc
            except TimeoutError:
                raise PublishError(
                    f"no confirm for message to {exchange}/{routing_key} "
                    f"within {self.settings.publish_timeout:g}s"
                ) from None
            except _RETRYABLE as exc:
                await self._await_reconnect(deadline, exchange, routing_key, exc)
                continue
            if isinstance(result, DeliveredMessage):
                raise Unroutable(f"no queue is bound for {routing_key!r} on {exchange}")
            return

    async def _await_reconnect(
        self, deadline: float, exchange: str, routing_key: str, exc: BaseException
    ) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise PublishError(
                f"broker unreachable: message to {exchange}/{routing_key} not confirmed "
                f"within {self.settings.publish_timeout:g}s"
            ) from exc
        logger.warning(
            "publish to %s/%s interrupted (%r); waiting for the broker", exchange, routing_key, exc
        )
        try:
            await asyncio.wait_for(self.channel.ready(), remaining)
        except TimeoutError:
            raise PublishError(
                f"broker unreachable: message to {exchange}/{routing_key} not confirmed "
                f"within {self.settings.publish_timeout:g}s"
            ) from exc
