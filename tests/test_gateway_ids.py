"""Message ids through the gateway: every copy the mesh forwards has an AMQP message_id of
its own, the sender's id travels in x-mesh-id, and receivers see the sender's id."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from agents_reliability import Host, Listen, Orders, drain, peek, subscriber
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from helpers import decision_of, running, take

from mesh import Message, RemoteError, Settings, topology
from mesh.envelope import MessageType
from mesh.gateway import Gateway

H_MESH_ID = "x-mesh-id"  # the header is part of the wire format: spelled out here
FORGED = "forged-id"





class Twinning(Host):
    """Sends, beside each request, an event that reuses the request's message_id."""

    async def send(self, message: Message, routing_key: str) -> None:
        if message.type is not MessageType.REQUEST:
            await super().send(message, routing_key)
            return
        twin = Message(
            topic="news.twin",
            payload={"twin": message.message_id},
            app_id=self.id,
            instance=self.instance,
            message_id=message.message_id,
        )
        # Published together, request first: the gateway relays the two side by side.
        await asyncio.gather(super().send(message, routing_key), super().send(twin, twin.topic))


class DeadLetterTap:
    """Every dead letter sent while it is open (a private queue on ``mesh.dlx``)."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue

    async def next(self, timeout: float = 15.0) -> AbstractIncomingMessage:
        """The next dead letter."""
        async with asyncio.timeout(timeout), self.queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                return message
        raise AssertionError("the dead-letter queue closed")

    async def until_marker(self, timeout: float = 15.0) -> list[AbstractIncomingMessage]:
        """The dead letters so far: those ahead of a marker this sends now."""
        marker = f"marker-{uuid.uuid4().hex}"
        exchange = await self.queue.channel.get_exchange(topology.DEAD_LETTER_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"{}", message_id=marker), "marker")
        seen: list[AbstractIncomingMessage] = []
        async with asyncio.timeout(timeout), self.queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.message_id == marker:
                    return seen
                seen.append(message)
        raise AssertionError("the dead-letter queue closed")


@asynccontextmanager
async def dead_letter_tap(settings: Settings) -> AsyncIterator[DeadLetterTap]:
    """A tap on ``mesh.dlx``; open it once an agent has declared the mesh's exchanges."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.DEAD_LETTER_EXCHANGE, "#")
        yield DeadLetterTap(queue)


async def test_event_and_request_sharing_a_message_id_keep_their_own_outcomes(
    settings: Settings,
) -> None:
    """20 pairs, each an event to a subscribed topic and a request nobody serves that share
    one message_id, sent at once: the request's return is not taken for the event's, so
    every event is delivered once and not dead-lettered, and every caller hears at once
    that its request is unroutable (not a timeout)."""
    service = subscriber(settings, Listen, agent_id="svc")
    caller = Twinning("caller", settings=settings)
    async with running(Gateway(settings=settings), service, caller):
        async with dead_letter_tap(settings) as dead:
            results = await asyncio.gather(
                *(caller.request("svc", "op", {"n": n}, timeout=10) for n in range(20)),
                return_exceptions=True,
            )
            received = await take(service.seen, 20)
            dead_letters = await dead.until_marker()
        stray = drain(service.seen)
    for result in results:
        assert isinstance(result, RemoteError), result
        assert result.error_type == "Unroutable"
        assert "'svc'" in result.detail
    assert [m.topic for m in received] == ["news.twin"] * 20
    # Each event reached its subscriber as sent, under the id its sender gave it.
    assert all(m.message_id == m.payload["twin"] for m in received)
    assert len({m.message_id for m in received}) == 20
    assert stray == []
    assert [(d.routing_key, d.headers) for d in dead_letters] == []


async def test_receiver_sees_the_senders_message_id_not_the_copys(settings: Settings) -> None:
    """The relayed copy has an AMQP message_id of its own and the sender's id in x-mesh-id;
    the subscriber's ``Message.message_id`` is the sender's."""
    service = subscriber(settings, Listen, agent_id="svc")
    sender = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), service, sender), peek(settings) as broker:
        copies = await broker.tap(topology.TOPIC_EXCHANGE, "news.#")
        message_id = await sender.publish("news.flash", {"text": "hi"})
        [received] = await take(service.seen, 1)
        raw = await broker.get(copies)
    assert raw.message_id and raw.message_id != message_id
    assert raw.headers[H_MESH_ID] == message_id
    assert received.message_id == message_id
    assert H_MESH_ID not in received.headers


async def test_sender_cannot_forge_the_mesh_id(settings: Settings) -> None:
    """A sender's own x-mesh-id is dropped: the relayed copy carries its real message_id."""
    service = subscriber(settings, Listen, agent_id="svc")
    sender = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), service, sender), peek(settings) as broker:
        copies = await broker.tap(topology.TOPIC_EXCHANGE, "news.#")
        message_id = await sender.publish("news.flash", {}, headers={H_MESH_ID: FORGED})
        [received] = await take(service.seen, 1)
        raw = await broker.get(copies)
    assert raw.headers[H_MESH_ID] == message_id
    assert received.message_id == message_id


async def test_a_denial_is_audited_under_the_senders_id(settings: Settings) -> None:
    """The audit record of a message the gateway denies names the sender's message_id, not
    one the sender forged in x-mesh-id; a denial is not dead-lettered."""
    sender = Host("anon", settings=settings)
    async with running(Gateway(settings=settings), sender), peek(settings) as broker:
        sender.transport.user = None  # type: ignore[assignment]  # publish without user_id
        message_id = await sender.publish("news.flash", {}, headers={H_MESH_ID: FORGED})
        record = await decision_of(settings, message_id)
        assert await broker.dead_letters_through_marker() == []
    assert (record.decision, record.stage, record.message_id) == (
        "denied",
        "authenticate",
        message_id,
    )
    assert "user_id" in (record.reason or "")


async def test_behaviours_dead_letter_carries_the_senders_id(settings: Settings) -> None:
    """A dead letter a behaviour sends (here: a payload its model rejects) is a copy with an
    AMQP message_id of its own and the original sender's id in x-mesh-id."""
    sub = subscriber(settings, Orders)
    async with running(Gateway(settings=settings), sub), dead_letter_tap(settings) as dead:
        message_id = await sub.publish("orders.new", {"item": "tea", "qty": "lots"})
        letter = await dead.next()
    assert letter.headers[H_MESH_ID] == message_id
    assert letter.message_id and letter.message_id != message_id
