"""A queue an earlier version declared with other arguments: re-created when empty, migrated
with --migrate-queues when it holds messages, never emptied behind the user's back."""

from __future__ import annotations

import json

import aio_pika
import pytest
from agents_reliability import Order, Orders, drain, subscriber
from aio_pika.exceptions import ChannelNotFoundEntity
from helpers import running, take

from mesh import Client, Message, Settings, TopologyError, topology
from mesh.envelope import to_amqp
from mesh.gateway import Gateway
from mesh.upgrade import holding_queue

QUEUE = topology.behaviour_queue("shop", "orders")
# How the version before queue length limits declared a behaviour queue.
EARLIER = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
    "x-delivery-limit": topology.BACKSTOP_DELIVERIES,
}


async def declare_as_earlier_version(settings: Settings, orders: int) -> None:
    """The queue as the earlier version left it, bound to ``orders.*``, holding ``orders``."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare_exchanges(channel)
        queue = await channel.declare_queue(QUEUE, durable=True, arguments=EARLIER)
        await queue.bind(topology.TOPIC_EXCHANGE, "orders.*")
        for n in range(orders):
            message = Message(topic="orders.new", payload={"item": f"old-{n}", "qty": n})
            await channel.default_exchange.publish(to_amqp(message), QUEUE)


async def declared_now(settings: Settings, arguments: dict[str, object]) -> bool:
    """Whether ``QUEUE`` exists with exactly ``arguments`` (a declare would fail otherwise)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(QUEUE, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed:
            return False
    return True


async def holding_exists(settings: Settings) -> bool:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(holding_queue(QUEUE), passive=True)
        except ChannelNotFoundEntity:
            return False
    return True


async def test_an_empty_queue_declared_otherwise_is_re_created(settings: Settings) -> None:
    await declare_as_earlier_version(settings, orders=0)
    shop = subscriber(settings, Orders, agent_id="shop")
    async with running(Gateway(settings=settings), shop):
        now = shop.behaviour("orders").queue_arguments
        assert "x-max-length" in now
        assert await declared_now(settings, now)


async def test_a_queue_with_messages_is_left_alone_and_the_error_names_the_way_through(
    settings: Settings,
) -> None:
    await declare_as_earlier_version(settings, orders=3)
    shop = subscriber(settings, Orders, agent_id="shop")
    with pytest.raises(TopologyError) as caught:
        async with running(shop):
            pass
    text = str(caught.value)
    assert "holds" in text and "message(s)" in text
    assert "--migrate-queues" in text
    assert "x-max-length" in text  # what the broker says differs
    assert await declared_now(settings, EARLIER)
    # Every message is still there (asked with basic.get: a quorum queue's declare-ok
    # count trails what it holds).
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).get_queue(QUEUE, ensure=False)
        held = []
        while (incoming := await queue.get(no_ack=True, fail=False)) is not None:
            held.append(json.loads(incoming.body)["item"])
    assert sorted(held) == ["old-0", "old-1", "old-2"]


async def test_migrating_moves_every_message_into_the_queue_declared_anew(
    settings: Settings,
) -> None:
    await declare_as_earlier_version(settings, orders=3)
    settings = settings.model_copy(update={"migrate_queues": True})
    shop = subscriber(settings, Orders, agent_id="shop")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), shop, client):
        old = await take(shop.seen, 3)
        assert sorted(o.item for o in old) == ["old-0", "old-1", "old-2"]
        await client.publish("orders.new", {"item": "new", "qty": 1})
        assert await take(shop.seen, 1) == [Order(item="new", qty=1)]
        assert await declared_now(settings, shop.behaviour("orders").queue_arguments)
        assert not await holding_exists(settings)
    assert drain(shop.seen) == []
