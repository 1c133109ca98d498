"""Handler delivery semantics: ack after return, retry, dead letters, replicas sharing a queue."""

from __future__ import annotations

import uuid
from collections import Counter

import aio_pika
import pytest
from agents_reliability import (
    Hold,
    Host,
    Order,
    Orders,
    counts_are,
    drain,
    host,
    peek,
    subscriber,
    user_of,
)
from helpers import eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.devservices import BrokerAdmin
from mesh.envelope import H_REASON
from mesh.gateway import Gateway


class Flaky(SubscriberBehaviour):
    """Fails the first two deliveries of a message, succeeds on the third."""

    attempts = 0
    retry_delays = (0.05, 0.1)

    @on("flaky.item")
    async def item(self, msg: Message, payload: object) -> None:
        self.attempts += 1
        host(self).seen.put_nowait(msg.attempt)
        if self.attempts < 3:
            raise RuntimeError(f"attempt {self.attempts} fails")


class Broken(SubscriberBehaviour):
    """Always fails."""

    retry_delays = (0.02, 0.05)

    @on("broken.item")
    async def explode(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.attempt)
        raise ValueError("cannot handle this item")


class BrokenTwice(Broken):
    max_deliveries = 2



class Share(SubscriberBehaviour):
    @on("share.item")
    async def item(self, msg: Message, payload: dict[str, int]) -> None:
        agent = host(self)
        agent.seen.put_nowait((agent.instance, payload["n"]))


async def test_ack_only_after_handler_returns(settings: Settings, admin: BrokerAdmin) -> None:
    """While the handler runs the message is unacked; once it returns the queue is empty."""
    queue = topology.behaviour_queue("sub", Hold.name)
    sub = subscriber(settings, Hold)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = await sub.publish("hold.item", {"n": 1})
        assert await take(sub.seen, 1) == [("started", message_id)]
        await eventually(lambda: counts_are(admin, settings, queue, ready=0, unacked=1))
        sub.release.set()
        assert await take(sub.seen, 1) == [("finished", message_id)]
        await eventually(lambda: counts_are(admin, settings, queue, ready=0, unacked=0))
        await sub.stop()
        # Closing the consumer's channel would have requeued an unacked message.
        assert await broker.depth(queue) == 0
        assert drain(sub.seen) == []


async def test_exception_requeues_until_the_handler_succeeds(settings: Settings) -> None:
    """A raising handler gets the message again, its attempt counting up; the 3rd try acks."""
    queue = topology.behaviour_queue("sub", Flaky.name)
    sub = subscriber(settings, Flaky)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        await sub.publish("flaky.item", {"n": 1})
        assert await take(sub.seen, 3) == [1, 2, 3]
        await sub.stop()
        assert await broker.depth(queue) == 0
        assert drain(sub.seen) == []


@pytest.mark.parametrize(("behaviour", "limit"), [(Broken, 5), (BrokenTwice, 2)])
async def test_always_failing_message_is_dead_lettered_after_max_deliveries(
    settings: Settings, behaviour: type[Broken], limit: int
) -> None:
    """After ``max_deliveries`` failed attempts the message goes to mesh.dead with the reason."""
    queue = topology.behaviour_queue("sub", behaviour.name)
    sub = subscriber(settings, behaviour)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = await sub.publish("broken.item", {"n": 7})
        dead = await broker.dead_letter(message_id)
        await sub.stop()
        assert dead.body == b'{"n":7}'
        reason = str(dead.headers[H_REASON])
        assert f"handler {behaviour.name}.explode failed {limit} times" in reason
        assert "ValueError: cannot handle this item" in reason
        assert dead.headers["x-mesh-queue"] == queue
        assert drain(sub.seen) == list(range(1, limit + 1))
        assert await broker.depth(queue) == 0


async def test_payload_failing_the_model_is_dead_lettered_at_once(settings: Settings) -> None:
    """A payload the handler's model rejects is dead-lettered without running the handler."""
    sub = subscriber(settings, Orders)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = await sub.publish("orders.new", {"item": "tea", "qty": "lots"})
        dead = await broker.dead_letter(message_id)
        await sub.publish("orders.new", {"item": "tea", "qty": 2})
        assert await take(sub.seen, 1) == [Order(item="tea", qty=2)]
        reason = str(dead.headers[H_REASON])
        assert "Order" in reason
        assert "qty" in reason
        assert sub.seen.empty()


async def test_body_that_is_not_json_is_dead_lettered_at_once(settings: Settings) -> None:
    """A non-JSON body that passed the gateway is dead-lettered saying so; no handler runs."""
    sub = subscriber(settings, Orders)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = uuid.uuid4().hex
        raw = aio_pika.Message(
            b"{not json", message_id=message_id, content_type="application/json",
            user_id=user_of(settings), app_id="raw", type="event",
        )
        await broker.publish_raw("orders.raw", raw)
        dead = await broker.dead_letter(message_id)
        assert dead.body == b"{not json"
        assert "not JSON" in str(dead.headers[H_REASON])
        await sub.publish("orders.new", {"item": "tea", "qty": 2})
        assert await take(sub.seen, 1) == [Order(item="tea", qty=2)]
        assert sub.seen.empty()


async def test_replicas_split_a_shared_queue(settings: Settings) -> None:
    """Two instances of one agent share its queue: each message is handled by exactly one."""
    first = subscriber(settings, Share, agent_id="pool", instance="a")
    second = subscriber(settings, Share, agent_id="pool", instance="b")
    second.seen = first.seen  # one record of who handled what
    publisher = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), first, second, publisher):
        for n in range(200):
            await publisher.publish("share.item", {"n": n})
        handled = await take(first.seen, 200)
        await first.stop()
        await second.stop()
    by_instance = Counter(instance for instance, _ in handled)
    assert by_instance["a"] > 0
    assert by_instance["b"] > 0
    assert sorted(n for _, n in handled) == list(range(200))
    assert first.seen.empty()
