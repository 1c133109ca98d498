"""Relay: the gateway behaviour that moves messages from ``mesh.gateway`` to ``mesh.topic``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from aio_pika.exceptions import ChannelInvalidStateError

from mesh import logcontext, topology
from mesh.acks import AckBatcher
from mesh.behaviour import Behaviour, Host
from mesh.bindings import Binding
from mesh.envelope import (
    CONTENT_TYPE,
    H_AUDIT,
    H_INSTANCE,
    H_REASON,
    H_REDACTED,
    H_USER,
    RESERVED_HEADERS,
    MessageType,
    encode_body,
    forwarded,
)
from mesh.gateway.audit import AuditTrail
from mesh.gateway.gate import RedisGate
from mesh.gateway.pipeline import Denied, Passage, Pipeline, Unavailable
from mesh.topology import TopicError
from mesh.transport import Abandoned, PublishError, Refused, Unroutable, is_stale

logger = logging.getLogger(__name__)


@dataclass
class _Window:
    """One consumer channel's acks, and what became of its deliveries.

    A channel that closes takes the acks of all its deliveries with it, hundreds at once:
    the relay says so in one line per channel, once the channel closed and its last
    delivery is done, not in a line per message.
    """

    acks: AckBatcher
    in_flight: int = 0
    returned: int = 0
    """Not relayed: the channel closed first, and the broker requeued them."""

    @property
    def unacked(self) -> int:
        """Relayed (the copy confirmed), but the ack was lost with the channel."""
        return self.acks.lost


class Relay(Behaviour):
    """Consumes the policy queue, runs the pipeline, republishes, then acks.

    The original is acked only after the broker confirmed the republished copy, so a
    gateway that dies mid-way leaves the message to another replica.  Handlers take
    deliveries in order and publish without awaiting anything before the channel, so
    one relay keeps each sender's order while up to ``max_concurrency`` confirms overlap.
    Acks go in batches (``mesh.acks``): one ``basic.ack(multiple=True)`` per event-loop
    turn for the deliveries handled meanwhile, rather than a socket write per message;
    a delivery dead-lettered or requeued is settled alone.

    When the consumer channel closes (a broker-side close, a lost connection), the broker
    requeues every delivery not acked on it and delivers it again.  A delivery whose copy
    is not out yet is not relayed: the transport asks right before it sends (``wanted``),
    so only the redelivery is relayed.  A delivery whose copy is already out is relayed
    twice: its batch's ack fails, or went out after the broker closed the channel and before
    the close reached the gateway (acks are not confirmed: the gateway cannot tell).  Those
    duplicates, up to the deliveries in flight (``mailbox_size``) per close, are the price
    of at-least-once that the relay alone cannot avoid; it reports the acks it knows
    failed, once per channel.
    """

    name = "relay"
    kind = "gateway"
    mailbox_size = 512
    max_concurrency = 512
    on_reject: ClassVar[str] = (
        f"the broker passes it to {topology.DEAD_LETTER_EXCHANGE}, without the reason"
    )
    """What the relay's queue does with a message the relay rejects."""

    pipeline: Pipeline
    trail: AuditTrail
    gate: RedisGate

    def __init__(self, agent: Host) -> None:
        super().__init__(agent)
        self._windows: dict[int, _Window] = {}

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
            channel = incoming.channel
        except ChannelInvalidStateError:
            return  # its channel closed on the way here: the broker requeued it
        # Keyed by the channel's id while its window (whose batcher holds it) is here.
        key = id(channel)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = self._open_window(key, channel)
        window.in_flight += 1
        window.acks.track(incoming)
        try:
            with logcontext.handling(incoming.message_id or "-"):
                await self._handle(incoming, window)
        finally:
            window.in_flight -= 1
            window.acks.release(incoming)
            self._close_window(key, window)

    def _open_window(self, key: int, channel: aiormq.abc.AbstractChannel) -> _Window:
        window = _Window(
            AckBatcher(channel, on_closed=lambda: self._close_window(key, window))
        )
        return window

    def _close_window(self, key: int, window: _Window) -> None:
        """Forget a closed channel's window once nothing of it is left, and report it."""
        done = window.acks.closed and window.in_flight == 0 and window.acks.idle
        if done and self._windows.get(key) is window:
            del self._windows[key]
            self._report(window)

    async def _handle(self, incoming: AbstractIncomingMessage, window: _Window) -> None:
        try:
            await self.relay(incoming, window)
        except Exception as exc:
            if is_stale(incoming):
                # Its channel closed, so the broker requeued it: another try will come.
                window.returned += 1
                logger.debug("relay of %s interrupted: %r", incoming.message_id, exc)
                return
            # Whatever went wrong, the message must not be retried into the same failure
            # on every replica: dead-letter it with the reason, or failing that reject it.
            await self._dead_letter(incoming, exc, window)

    async def relay(self, incoming: AbstractIncomingMessage, window: _Window) -> None:
        while True:
            await self.gate.wait()
            if is_stale(incoming):  # its channel closed while it waited: it comes again
                window.returned += 1
                return
            passage = Passage(incoming=incoming, routing_key=incoming.routing_key or "")
            try:
                await self._decide(passage, window)
            except Unavailable as exc:
                self.gate.close(exc)
                continue
            return

    async def _decide(self, passage: Passage, window: _Window) -> None:
        """Run the pipeline and act on its decision, once the audit trail holds it."""
        try:
            await self.pipeline.run(passage)
        except Denied as denied:
            audit_id = await self.trail.record(passage, denied)
            await self._deny(passage, denied, audit_id, window)
            return
        audit_id = await self.trail.record(passage)
        self.agent.metrics.decided("pipeline", "passed")
        await self._pass(passage, window, audit_id)

    async def _pass(self, passage: Passage, window: _Window, audit_id: str | None) -> None:
        incoming = passage.incoming
        headers = passage.headers
        if passage.redacted:
            headers[H_REDACTED] = list(passage.redacted)
        if audit_id is not None:
            headers[H_AUDIT] = audit_id
        # The copy carries the sender's id in x-mesh-id (whatever the sender put there
        # is replaced) and an AMQP message_id of its own, so a sender reusing an id
        # cannot make one copy's return pass for another's (see ``forwarded``).
        copy = forwarded(
            incoming, headers, sender_id=incoming.message_id or "", body=passage.body
        )
        try:
            await self.agent.transport.publish(
                topology.delivery_exchange(passage.routing_key),
                passage.routing_key,
                copy,
                mandatory=topology.is_request(passage.routing_key),
                # Asked right before each send (also after a reconnect): a delivery whose
                # channel closed is back in the queue, and relaying it would relay it twice.
                wanted=lambda: not is_stale(incoming),
            )
        except Abandoned:
            window.returned += 1
            return
        except Unroutable:
            await self._no_route(passage)
            window.acks.done(incoming)
            return
        except Refused:
            raise  # no replica can relay it: _handle dead-letters it with the reason
        except PublishError as exc:
            if is_stale(incoming):
                window.returned += 1
                return
            logger.error("relay of %s failed, requeueing: %s", incoming.message_id, exc)
            await window.acks.reject(incoming, requeue=True)
            return
        # Should the channel close before the batch's ack is out, the broker redelivers the
        # original, which is relayed again (a duplicate, never a dead letter): counted by
        # the batcher and reported once per channel (``_report``).
        window.acks.done(incoming)

    async def _dead_letter(
        self, incoming: AbstractIncomingMessage, exc: Exception, window: _Window
    ) -> None:
        """Dead-letter a message the relay failed on, with the reason; failing that, reject it.

        The outcome is logged once it happened, as what it is.
        """
        reason = f"gateway relay failed: {type(exc).__name__}: {exc}"
        try:
            await self.agent.dead_letters.send(
                incoming,
                reason,
                self.queue_name,
                headers=_sender_headers(incoming),
                sender_id=incoming.message_id or "",
            )
        except Exception as failure:
            if await window.acks.reject(incoming, requeue=False):
                outcome = f"rejected it: {self.on_reject}"
            else:
                outcome = "its channel closed meanwhile, so the broker redelivers it"
            logger.error(
                "relay of %s failed (%s), and so did dead-lettering it (%s: %s); %s",
                incoming.message_id,
                reason,
                type(failure).__name__,
                failure,
                outcome,
                exc_info=exc,
            )
            return
        logger.error(
            "relay of %s failed; dead-lettered it: %s", incoming.message_id, reason, exc_info=exc
        )
        await window.acks.ack(incoming)

    def _report(self, window: _Window) -> None:
        """Say, once per closed channel, what the close did to the deliveries in flight."""
        if window.unacked:
            logger.warning(
                "%d relayed messages from %s could not be acked: their channel closed; the "
                "broker redelivers them (and any acked just before the close reached the "
                "gateway), and subscribers may see them twice",
                window.unacked,
                self.queue_name,
            )
        if window.returned:
            logger.info(
                "%d messages from %s were not relayed: their channel closed, and the broker "
                "redelivers them",
                window.returned,
                self.queue_name,
            )

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

    async def _deny(
        self, passage: Passage, denied: Denied, audit_id: str | None, window: _Window
    ) -> None:
        """Tell the sender why, and drop the message: a denial is recorded (the audit trail),
        not dead-lettered, so that a flood of them cannot push real dead letters out of
        ``mesh.dead``, which is for what a receiver could not handle."""
        incoming = passage.incoming
        self.agent.metrics.decided(denied.stage, "denied")
        logger.warning(
            "denied %s from %s/%s on %s: %s",
            incoming.message_id,
            incoming.user_id,
            incoming.app_id,
            passage.routing_key,
            denied,
        )
        notice = {**denied.notice(), "message_id": incoming.message_id}
        if audit_id is not None:
            notice["audit"] = audit_id
        await self._notify(passage, notice)
        window.acks.done(incoming)

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
    on_reject: ClassVar[str] = "the broker drops it"

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
