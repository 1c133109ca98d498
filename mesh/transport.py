"""The AMQP transport: robust connections, a confirming publisher, consumer channels."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import (
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
from mesh.connection import BackoffConnection, connect
from mesh.metrics import Metrics
from mesh.tls import amqp_ssl_context

logger = logging.getLogger(__name__)

# Failures after which the message may not have reached the broker but the connection
# will come back: wait for the robust connection, then publish again.
_RETRYABLE = (AMQPConnectionError, ChannelInvalidStateError, ConnectionError)

# Publishing and a refusal, as aio-pika 10.2.1 / aiormq 7.2.4 handle it.  For a refused
# publish (404 no such exchange, 403 no write permission …) RabbitMQ closes the channel
# (Channel.Close), and then:
#  1. every confirm pending on that channel fails with the same error, whichever message
#     caused it (aiormq Channel._on_close_frame raises it; Base.close rejects the
#     channel's futures with it, FutureStore.reject_all);
#  2. aiormq queues its close-ok at once (Channel._on_close_frame) but reports the channel
#     closed (is_closed) only some loop turns later, and its publish lock checks only
#     is_closed (Channel.lock): a publish in between follows the close-ok;
#  3. aiormq frees the channel number on reading the Channel.Close (Connection.__reader),
#     before its close-ok is queued, and drops the close-ok when the connection's write
#     queue (10 frames) is full (put_nowait under suppress(QueueFull)): a channel opened
#     then can take the number while the broker still waits for that close-ok;
#  4. aio-pika's RobustChannel reopens itself (RobustChannel._on_close -> restore ->
#     reopen), a new aiormq channel behind the same object.
# For a frame after a channel's close-ok (2) or a Channel.Open before it (3) RabbitMQ
# closes the whole connection (504 CHANNEL_ERROR "expected 'channel.open'", "second
# 'channel.open' seen"), consumers and all.  Hence publishing has a connection of its own,
# where nothing but ``Transport.publish`` queues frames or opens channels: the shared
# channel and the probe have fixed numbers, each reopened only after its own close-ok was
# queued; publishes on the shared channel leave room in the write queue for a close-ok
# (``_has_room``); and a publish is only sent on a channel that is not closing (see
# ``Transport._writable``).


async def settle(operation: Awaitable[Any]) -> None:
    """Run an ack, nack, reject or close that may fail because the channel died.

    When it does, the broker has already returned the message to its queue.
    """
    try:
        await operation
    except Exception as exc:
        logger.debug("could not settle message (%r); the broker will redeliver it", exc)


async def ack(incoming: AbstractIncomingMessage, *, multiple: bool = False) -> bool:
    """Ack ``incoming``; false when its channel closed first (the broker requeued it).

    ``multiple`` acks every unacked delivery of its channel up to ``incoming`` as well
    (``mesh.acks`` says when that is safe).  Never hangs on a lost connection: an ack
    waiting for room in the write queue of a connection whose writer is gone (aiormq
    leaves that queue full) gives up when the channel closes.  True does not prove the
    broker got the ack: acks are not confirmed, and one sent after the broker closed the
    channel, before the close reached us, is lost as well.
    """
    return await _settle_delivery(incoming, lambda: incoming.ack(multiple=multiple))


async def reject(incoming: AbstractIncomingMessage, *, requeue: bool) -> bool:
    """Reject ``incoming`` (to its queue again, or to its dead-letter exchange, if any);
    false when its channel closed first.  Like ``ack``, never hangs on a lost connection."""
    return await _settle_delivery(incoming, lambda: incoming.reject(requeue=requeue))


async def _settle_delivery(
    incoming: AbstractIncomingMessage, operation: Callable[[], Awaitable[None]]
) -> bool:
    try:
        channel = incoming.channel
    except ChannelInvalidStateError:
        return False
    if _closing(channel):
        return False
    if isinstance(channel, aiormq.Channel) and not channel.connection.write_queue.full():
        # The common case: queued at once; a close fails the wait for the write.
        try:
            await operation()
        except Exception:
            return False
        return True
    settling = asyncio.ensure_future(operation())
    closed = channel.closing  # an observer: cancelling it leaves the channel alone
    try:
        await asyncio.wait((settling, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
    if not settling.done():
        settling.cancel()
        await asyncio.gather(settling, return_exceptions=True)
        return False
    return not settling.cancelled() and settling.exception() is None


def is_stale(incoming: AbstractIncomingMessage) -> bool:
    """Whether ``incoming`` came on a channel that has since closed, or that the broker is
    closing: either way the broker requeued it, and settling it is no longer possible."""
    try:
        return _closing(incoming.channel)
    except ChannelInvalidStateError:
        return True


class PublishError(RuntimeError):
    """The broker did not confirm a message; it may or may not have been delivered."""


class Unroutable(PublishError):
    """A mandatory message matched no queue."""


class Refused(PublishError):
    """The broker refused the message (no such exchange, no permission); retrying won't help."""


class Abandoned(PublishError):
    """The message was not sent: the caller's ``wanted`` said it is no longer wanted."""


class Transport:
    """Robust AMQP connections shared by everything in one agent instance.

    ``connection`` carries consumers (a channel each, so that each has its own prefetch
    window) and declarations (``channel``).  Publishing has a connection of its own (see
    the note above ``Transport``; RabbitMQ also blocks a publishing connection under a
    resource alarm, which then does not stop consumers): ``publish`` returns only after
    the broker confirmed the message, and retries across reconnections until
    ``settings.publish_timeout``.  ``metrics`` counts confirms and reconnects.
    """

    def __init__(
        self, settings: Settings, connection_name: str, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.connection_name = connection_name
        self.metrics = metrics or Metrics()
        self.user = unquote(urlsplit(settings.amqp_url).username or "guest")
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._publishing: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._reopened: asyncio.Future[None] | None = None
        self._probe: aiormq.abc.AbstractChannel | None = None
        self._last_writable: aiormq.Channel | None = None
        self._probe_lock = asyncio.Lock()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("transport is not connected")
        return self._connection

    @property
    def channel(self) -> AbstractRobustChannel:
        """A channel for declarations (confirm mode)."""
        if self._channel is None:
            raise RuntimeError("transport is not connected")
        return self._channel

    @property
    def publishing(self) -> AbstractRobustConnection:
        """The connection ``publish`` uses, and nothing else may."""
        if self._publishing is None:
            raise RuntimeError("transport is not connected")
        return self._publishing

    @property
    def connected(self) -> bool:
        """Whether both connections are up: connected, and not lost and reconnecting."""
        return all(
            connection is not None
            and not connection.is_closed
            and not (isinstance(connection, BackoffConnection) and connection.lost)
            for connection in (self._connection, self._publishing)
        )

    async def connect(self) -> None:
        self._connection = await self._connect(self.connection_name)
        self._connection.reconnect_callbacks.add(lambda _: self.metrics.reconnected("consuming"))
        self._channel = await self.open_channel()
        self._publishing = await self._connect(f"{self.connection_name} publishing")
        self._publishing.reconnect_callbacks.add(lambda _: self.metrics.reconnected("publishing"))
        self._publisher = await self._publishing.channel(
            channel_number=_SHARED_CHANNEL, publisher_confirms=True
        )
        self._publisher.reopen_callbacks.add(self._on_publisher_reopened)

    async def _connect(self, name: str) -> AbstractRobustConnection:
        return await connect(
            self.settings.amqp_url,
            name,
            where=self._where(),
            vhost=self._vhost(),
            user=self.user,
            wait=self.settings.connect_timeout,
            ssl_context=amqp_ssl_context(self.settings),
        )

    def _where(self) -> str:
        url = urlsplit(self.settings.amqp_url)  # named without the password
        return f"{url.hostname}:{url.port or 5672}"

    def _vhost(self) -> str:
        return unquote(urlsplit(self.settings.amqp_url).path[1:]) or "/"

    async def open_channel(
        self, prefetch: int | None = None, *, confirms: bool = True
    ) -> AbstractRobustChannel:
        channel = await self.connection.channel(publisher_confirms=confirms)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def close(self) -> None:
        for connection in (self._publishing, self._connection):
            if connection is not None:
                await connection.close()
        self._connection = None
        self._channel = None
        self._publishing = None
        self._publisher = None
        self._probe = None
        self._last_writable = None

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.abc.AbstractMessage,
        *,
        mandatory: bool = False,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm; raise ``PublishError`` otherwise.

        A message the broker refuses (no such exchange, no permission …) fails alone: the
        broker closes the shared channel for it, which fails every confirm pending there,
        so each of those is published again, one at a time, on a probe channel, where only
        its own refusal can fail it.  A message re-published this way may arrive twice
        (its first copy may have been routed before the close took its confirm) and after
        messages published later.

        ``wanted``, if given, is asked right before the message is sent, the first time
        and each time it is sent again (after a reconnect, on the probe); when it answers
        false, nothing is sent and ``Abandoned`` is raised.  The gateway's relay uses it
        so as not to send the copy of a delivery whose channel closed meanwhile: the broker
        requeued that delivery, and its next delivery is relayed instead.
        """
        try:
            await self._publish(exchange, routing_key, message, mandatory=mandatory, wanted=wanted)
        except Abandoned:
            raise  # not sent: nothing for the broker to confirm
        except PublishError:
            self.metrics.published(confirmed=False)
            raise
        self.metrics.published(confirmed=True)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.abc.AbstractMessage,
        *,
        mandatory: bool,
        wanted: Callable[[], bool] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        while True:
            try:
                try:
                    result = await self._publish_shared(
                        exchange, routing_key, message, mandatory, deadline, wanted=wanted
                    )
                except ChannelClosed as closed:
                    # Maybe this message's refusal, maybe another's (see the note above).
                    logger.debug(
                        "publishing channel closed (%s); probing %s/%s on its own",
                        closed, exchange, routing_key,
                    )
                    result = await self._publish_alone(
                        exchange, routing_key, message, mandatory, deadline, wanted=wanted
                    )
            except (DeliveryError, ChannelClosed) as exc:
                # A refusal (no permission, no such exchange …) will not change on retry.
                raise Refused(
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

    async def _publish_shared(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.abc.AbstractMessage,
        mandatory: bool,
        deadline: float,
        *,
        wanted: Callable[[], bool] | None,
    ) -> object:
        channel = await self._writable(deadline)
        # Nothing may yield between _writable's checks and the frames being queued: with
        # wait=False, the channel lock free and room in the write queue, basic_publish
        # queues them before its first yield.  Nor between ``wanted`` and the frames.
        _check_wanted(wanted, exchange, routing_key)
        return await channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=message.properties,
            mandatory=mandatory,
            timeout=self._remaining(deadline),
            wait=False,
        )

    async def _writable(self, deadline: float) -> aiormq.Channel:
        """The shared channel's aiormq channel, once a publish on it cannot follow a close-ok.

        That is: the channel is not closing, and basic_publish will queue the frames
        without yielding.  It yields only for the channel lock or for room in the write
        queue; the lock is free because only ``_publish_shared`` uses the channel once it
        is ready, and never holds the lock across a yield (wait=False: no waiting for the
        frames to be written).  Room is checked here, leaving some to close-oks,
        the probe and heartbeats.
        """
        # The common case costs no await: the channel the last publish used is still open
        # (a reopened robust channel has a new aiormq channel; the old one reads closed).
        last = self._last_writable
        if last is not None and not _closing(last) and _has_room(last):
            return last
        publisher = self._publisher
        if publisher is None:
            raise RuntimeError("transport is not connected")
        while True:
            await self._wait(publisher.ready(), deadline)
            channel = await publisher.get_underlay_channel()
            if not isinstance(channel, aiormq.Channel):
                raise TypeError(f"unexpected AMQP channel {channel!r}")
            if _closing(channel):
                await self._await_reopen(channel, deadline)
                continue
            if not _has_room(channel):
                # The connection's writer takes everything queued in one go; a connection
                # lost meanwhile never drains its queue, but its channel's close ends the wait.
                await self._wait(_drained_or_closed(channel), deadline)
                continue
            self._last_writable = channel
            return channel

    async def _await_reopen(self, closing: aiormq.Channel, deadline: float) -> None:
        """Wait until the robust channel replaced ``closing`` with a new channel."""
        if self._reopened is None or self._reopened.done():
            self._reopened = asyncio.get_running_loop().create_future()
        reopened = self._reopened
        # The robust channel reopens in a callback of aiormq reporting ``closing`` closed,
        # then calls its reopen_callbacks, ``_on_publisher_reopened`` among them; so does
        # a connection that comes back (RobustConnection restores its channels).
        with suppress(Exception):  # the close's reason is the pending publishes' business
            await self._wait(asyncio.shield(closing.closing), deadline)
        await self._wait(asyncio.shield(reopened), deadline)

    def _on_publisher_reopened(self, _channel: Any) -> None:
        if self._reopened is not None and not self._reopened.done():
            self._reopened.set_result(None)

    async def _wait(self, operation: Awaitable[Any], deadline: float) -> None:
        """Wait for the publishing channel; a broker not back by ``deadline`` is unreachable."""
        try:
            await asyncio.wait_for(operation, self._remaining(deadline))
        except TimeoutError:
            if inspect.iscoroutine(operation):
                operation.close()  # never started when the deadline had already passed
            raise ChannelInvalidStateError("publishing channel not back in time") from None

    async def _publish_alone(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.abc.AbstractMessage,
        mandatory: bool,
        deadline: float,
        *,
        wanted: Callable[[], bool] | None,
    ) -> object:
        """Publish on the probe channel, which carries one message at a time.

        The probe is a plain aiormq channel (a robust one would reopen itself after a
        refusal, without waiting for anyone), opened on first need and kept.  One message
        at a time on one channel, not a channel each: each channel opened while another
        is being closed risks taking its number (3 in the note above ``Transport``).
        """
        await asyncio.wait_for(self._probe_lock.acquire(), self._remaining(deadline))
        try:
            probe = self._probe
            if probe is None or _closing(probe):
                probe = self._probe = await self._open_probe(deadline)
            _check_wanted(wanted, exchange, routing_key)
            try:
                return await probe.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=mandatory,
                    timeout=self._remaining(deadline),
                )
            except BaseException:
                # A confirm still due could otherwise close the probe under the next message.
                self._probe = None
                if not _closing(probe):
                    await settle(probe.close())
                raise
        finally:
            self._probe_lock.release()

    async def _open_probe(self, deadline: float) -> aiormq.abc.AbstractChannel:
        transport = self.publishing.transport
        if transport is None:
            raise ChannelInvalidStateError("connection is down")
        try:
            return await transport.connection.channel(
                channel_number=_PROBE_CHANNEL,
                publisher_confirms=True,
                on_return_raises=False,  # a return is a result, as on the shared channel
                timeout=self._remaining(deadline),
            )
        except ChannelInvalidStateError:
            raise
        except (RuntimeError, ValueError) as exc:
            # The connection is closed, or the old probe's close has not finished (its
            # number is still taken): try again once the connection is back.
            raise ChannelInvalidStateError(str(exc)) from exc

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        return remaining

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
            await asyncio.wait_for(self.publishing.ready(), remaining)
        except TimeoutError:
            raise PublishError(
                f"broker unreachable: message to {exchange}/{routing_key} not confirmed "
                f"within {self.settings.publish_timeout:g}s"
            ) from exc


# The publishing connection's only channels, numbered so that neither takes the other's.
_SHARED_CHANNEL = 1
_RESERVED_FRAMES = 3
_PROBE_CHANNEL = 2


def _has_room(channel: aiormq.Channel) -> bool:
    """Whether the write queue takes a publish and keeps room for a close-ok, a heartbeat
    and a probe (aiormq drops a close-ok that finds the queue full).

    Keeping exactly that much, not half the queue, matters: waiting for the writer to
    drain a half-full queue cost about a tenth of the mesh's throughput.
    """
    queue = channel.connection.write_queue
    return not queue.maxsize or queue.qsize() < queue.maxsize - _RESERVED_FRAMES


def _check_wanted(wanted: Callable[[], bool] | None, exchange: str, routing_key: str) -> None:
    if wanted is not None and not wanted():
        raise Abandoned(f"message to {exchange}/{routing_key} no longer wanted; not sent")


async def _drained_or_closed(channel: aiormq.Channel) -> None:
    """Until the connection's writer drained its write queue, or ``channel`` closed."""
    drained = asyncio.ensure_future(channel.connection.write_queue.join())
    closed = channel.closing  # an observer: cancelling it leaves the channel alone
    try:
        await asyncio.wait((drained, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        drained.cancel()
        closed.cancel()


def _closing(channel: aiormq.abc.AbstractChannel) -> bool:
    """Whether ``channel`` is closed, or the broker closed it and aiormq has not caught up.

    aiormq sets ``_close_exception`` in the step that queues the close-ok
    (Channel._on_close_frame), before anything can follow the close-ok.
    """
    return channel.is_closed or getattr(channel, "_close_exception", None) is not None
