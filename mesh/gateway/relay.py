"""Relay: the gateway behaviour that moves messages from ``mesh.gateway`` to ``mesh.topic``."""

from __future__ import annotations

import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from mesh import logcontext, topology
from mesh.behaviour import Behaviour
from mesh.bindings import Binding
from mesh.envelope import (
    CONTENT_TYPE,
    H_INSTANCE,
    H_REASON,
    H_USER,
    RESERVED_HEADERS,
    MessageType,
    encode_body,
    forwarded,
)
from mesh.gateway.pipeline import Denied, Passage, Pipeline
from mesh.topology import TopicError
from mesh.transport import PublishError, Refused, Unroutable, is_stale, settle

logger = logging.getLogger(__name__)


class Relay(Behaviour):
    """Consumes the policy queue, runs the pipeline, republishes, then acks.

    The original is acked only after the broker confirmed the republished copy, so a
    gateway that dies mid-way leaves the message to another replica.  Handlers take
    deliveries in order and publish without awaiting anything before the channel, so
    one relay keeps each sender's order while up to ``max_concurrency`` confirms overlap.
    """

    name = "relay"
    kind = "gateway"
    mailbox_size = 512
    max_concurrency = 512

    pipeline: Pipeline

    @property
    def consumes(self) -> bool:
        return True

    @property
    def queue_name(self) -> str:
        return topology.GATEWAY_QUEUE

    @property
    def bindings(self) -> list[Binding]:
        return [Binding(topology.POLICY_EXCHANGE, "#")]

    async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        return await topology.declare_gateway_queue(channel)

    async def handle_delivery(self, incoming: AbstractIncomingMessage) -> None:
        try:
            with logcontext.handling(incoming.message_id or "-"):
                await self.relay(incoming)
        except Exception as exc:
            if is_stale(incoming):
                # Its channel closed, so the broker requeued it: another try will come.
                logger.warning("relay of %s interrupted: %r", incoming.message_id, exc)
                return
            # Whatever went wrong, the message must not be retried into the same failure
            # on every replica: dead-letter it with the reason, or failing that reject it
            # (mesh.gateway dead-letters a rejected message; mesh.gateway.internal drops it).
            logger.exception("relay of %s failed; dead-lettering it", incoming.message_id)
            try:
                await self.agent.dead_letters.send(
                    incoming,
                    f"gateway relay failed: {type(exc).__name__}: {exc}",
                    self.queue_name,
                    headers=_sender_headers(incoming),
                    sender_id=incoming.message_id or "",
                )
            except Exception:
                await settle(incoming.reject(requeue=False))
                return
            await settle(incoming.ack())

    async def relay(self, incoming: AbstractIncomingMessage) -> None:
        passage = Passage(incoming=incoming, routing_key=incoming.routing_key or "")
        try:
            await self.pipeline.run(passage)
        except Denied as denied:
            await self._deny(passage, denied)
            return
        # The copy carries the sender's id in x-mesh-id (whatever the sender put there
        # is replaced) and an AMQP message_id of its own, so a sender reusing an id
        # cannot make one copy's return pass for another's (see ``forwarded``).
        copy = forwarded(incoming, passage.headers, sender_id=incoming.message_id or "")
        try:
            await self.agent.transport.publish(
                topology.delivery_exchange(passage.routing_key),
                passage.routing_key,
                copy,
                mandatory=topology.is_request(passage.routing_key),
            )
        except Unroutable:
            await self._no_route(passage)
        except Refused:
            raise  # no replica can relay it: handle_delivery dead-letters it with the reason
        except PublishError as exc:
            logger.error("relay of %s failed, requeueing: %s", incoming.message_id, exc)
            await settle(incoming.nack(requeue=True))
            return
        # The copy is out: an ack lost with its channel only means a duplicate, never a
        # dead letter of a message that was relayed.
        await settle(incoming.ack())

    async def _no_route(self, passage: Passage) -> None:
        words = passage.routing_key.split(".", 2)
        if len(words) == 3 and topology.is_request(passage.routing_key):
            _, agent, operation = words
            error = f"no instance of agent {agent!r} serves operation {operation!r}"
        else:
            # Only requests are published mandatory, but a wrong key must not crash the
            # handling of this message (it would dead-letter it as well).
            error = f"no queue is bound for {passage.routing_key!r}"
        await self._notify(passage, {"error": error, "type": "Unroutable"})

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
        await self.agent.dead_letters.send(
            incoming,
            f"denied by gateway {denied.stage}: {denied.reason}",
            self.queue_name,
            headers=_sender_headers(incoming),
            sender_id=incoming.message_id or "",
        )
        await settle(incoming.ack())

    async def _notify(self, passage: Passage, body: dict[str, Any]) -> None:
        """Tell the sender: on its reply route for a request, else on its error route.

        Never raises: a notice is a courtesy, and its failure must not decide what
        happens to the message (the caller settles it either way).
        """
        try:
            await self._send_notice(passage, body)
        except Exception:
            logger.exception("could not notify the sender of %s", passage.incoming.message_id)

    async def _send_notice(self, passage: Passage, body: dict[str, Any]) -> None:
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
            await self.agent.transport.publish(topology.INTERNAL_EXCHANGE, key, notice)
        except PublishError as exc:
            logger.warning("could not notify %s: %s", key, exc)


class InternalRelay(Relay):
    """The relay of the mesh's own lane: ``mesh.gateway.internal`` to ``mesh.internal``."""

    name = "relay_internal"

    @property
    def queue_name(self) -> str:
        return topology.INTERNAL_GATEWAY_QUEUE

    @property
    def bindings(self) -> list[Binding]:
        return [Binding(topology.INTERNAL_POLICY_EXCHANGE, "#")]

    async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        return await topology.declare_internal_gateway_queue(channel)


def _sender_headers(incoming: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead letter's headers: only those a sender may set, and the user RabbitMQ verified."""
    headers = {k: v for k, v in (incoming.headers or {}).items() if k not in RESERVED_HEADERS}
    if incoming.user_id:
        headers[H_USER] = incoming.user_id
    return headers
