"""Relay: the gateway behaviour that moves messages from ``mesh.gateway`` to ``mesh.topic``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from mesh import topology
from mesh.behaviour import Behaviour
from mesh.envelope import (
    CONTENT_TYPE,
    H_INSTANCE,
    H_REASON,
    H_USER,
    RESERVED_HEADERS,
    MessageType,
    encode_body,
)
from mesh.gateway.pipeline import Denied, Passage, Pipeline
from mesh.topology import TopicError
from mesh.transport import PublishError, Unroutable, is_stale, settle

logger = logging.getLogger(__name__)


class Relay(Behaviour):
    """Consumes the policy queue, runs the pipeline, republishes, then acks.

    The original is acked only after the broker confirmed the republished copy, so a
    gateway that dies mid-way leaves the message to another replica.  aio-pika hands
    each delivery to its own task in delivery order, and publishes enter the channel
    in that order, so relaying keeps each sender's order while confirms overlap.
    """

    name = "relay"
    kind = "gateway"
    mailbox_size = 512

    pipeline: Pipeline

    async def main(self) -> int | None:
        transport = self.agent.transport
        channel = await transport.open_channel(prefetch=self.mailbox_size, confirms=False)
        # Declared rather than looked up: only declared queues get their consumer back
        # when the robust connection recovers.
        queue = await topology.declare_gateway_queue(channel)
        in_flight: set[asyncio.Task[Any]] = set()
        idle = asyncio.Event()
        idle.set()

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            in_flight.add(task)
            idle.clear()
            try:
                await self.relay(incoming)
            except Exception:
                # Whatever went wrong, the message must not hold a prefetch slot forever
                # nor poison the next replica: mesh.gateway dead-letters a rejected message.
                logger.exception("relay of %s failed; dead-lettering it", incoming.message_id)
                await settle(incoming.reject(requeue=False))
            finally:
                in_flight.discard(task)
                if not in_flight:
                    idle.set()

        tag = await queue.consume(on_message)
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self._drain(queue, tag, idle, channel))
        return None

    async def _drain(self, queue: Any, tag: str, idle: asyncio.Event, channel: Any) -> None:
        try:
            await queue.cancel(tag)
            await asyncio.wait_for(idle.wait(), self.agent.settings.shutdown_timeout)
        except Exception as exc:  # unacked messages go back to the queue on close
            logger.warning("relay drain incomplete: %r", exc)
        await channel.close()

    async def relay(self, incoming: AbstractIncomingMessage) -> None:
        if is_stale(incoming):
            return  # the broker requeued it with its channel; relaying it now would duplicate it
        passage = Passage(incoming=incoming, routing_key=incoming.routing_key or "")
        try:
            await self.pipeline.run(passage)
        except Denied as denied:
            await self._deny(passage, denied)
            return
        copy = aio_pika.Message(
            incoming.body,
            headers=passage.headers,
            content_type=incoming.content_type,
            delivery_mode=incoming.delivery_mode,
            correlation_id=incoming.correlation_id,
            reply_to=incoming.reply_to,
            expiration=incoming.expiration,
            message_id=incoming.message_id,
            timestamp=incoming.timestamp,
            type=incoming.type,
            app_id=incoming.app_id,
        )
        try:
            await self.agent.transport.publish(
                topology.TOPIC_EXCHANGE,
                passage.routing_key,
                copy,
                mandatory=topology.is_request(passage.routing_key),
            )
        except Unroutable:
            await self._no_route(passage)
        except PublishError as exc:
            logger.error("relay of %s failed, requeueing: %s", incoming.message_id, exc)
            await incoming.nack(requeue=True)
            return
        await incoming.ack()

    async def _no_route(self, passage: Passage) -> None:
        _, agent, operation = passage.routing_key.split(".", 2)
        await self._notify(
            passage,
            {
                "error": f"no instance of agent {agent!r} serves operation {operation!r}",
                "type": "Unroutable",
            },
        )

    async def _deny(self, passage: Passage, denied: Denied) -> None:
        incoming = passage.incoming
        logger.warning(
            "denied %s from %s/%s on %s: %s",
            incoming.message_id,
            incoming.user_id,
            incoming.app_id,
            passage.routing_key,
            denied,
        )
        await self._notify(
            passage,
            {
                "error": denied.reason,
                "type": "Denied",
                "stage": denied.stage,
                "message_id": incoming.message_id,
            },
        )
        # The copy keeps only headers a sender may set, and the user RabbitMQ verified.
        headers = {k: v for k, v in (incoming.headers or {}).items() if k not in RESERVED_HEADERS}
        if incoming.user_id:
            headers[H_USER] = incoming.user_id
        await self.agent.dead_letters.send(
            incoming,
            f"denied by gateway {denied.stage}: {denied.reason}",
            topology.GATEWAY_QUEUE,
            headers=headers,
        )
        await incoming.ack()

    async def _notify(self, passage: Passage, body: dict[str, Any]) -> None:
        """Tell the sender: on its reply route for a request, else on its error route."""
        incoming = passage.incoming
        headers: dict[str, Any] = {H_REASON: str(body.get("error", ""))}
        instance = (incoming.headers or {}).get(H_INSTANCE)
        try:
            # Built from the sender's identity, never from a route it supplied.
            agent = topology.check_name("agent id", incoming.app_id or "")
            instance = topology.check_name("instance id", str(instance or ""))
        except TopicError:
            return
        if incoming.type == MessageType.REQUEST:
            key = topology.reply_key(agent, instance)
        else:
            key = topology.error_key(agent, instance)
        notice = aio_pika.Message(
            encode_body(body),
            headers=headers,
            content_type=CONTENT_TYPE,
            correlation_id=incoming.correlation_id,
            type=MessageType.ERROR.value,
            app_id=self.agent.id,
        )
        try:
            await self.agent.transport.publish(topology.TOPIC_EXCHANGE, key, notice)
        except PublishError as exc:
            logger.warning("could not notify %s: %s", key, exc)
