"""Handler failures: counted by the mesh, retried after a delay through the agent's retry path,
dead-lettered with the reason after ``max_deliveries``; hand-backs and stops lose nothing."""

from __future__ import annotations

import asyncio

import aio_pika
from agents_reliability import Host, Order, Peek, counts_are, drain, host, peek, subscriber
from aio_pika.exceptions import ChannelNotFoundEntity
from helpers import eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.devservices import BrokerAdmin
from mesh.envelope import H_REASON
from mesh.gateway import Gateway


class Held(SubscriberBehaviour):
    """Broadcast: every instance gets its own copy. Holds message 0 until ``release``."""

    broadcast = True

    @on("held.item")
    async def item(self, msg: Message, payload: dict[str, int]) -> None:
        agent = host(self)
        agent.seen.put_nowait(payload["n"])
        if payload["n"] == 0:
            await agent.release.wait()


async def test_stopping_a_broadcast_behaviour_loses_nothing_it_had_taken(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """Messages prefetched by a broadcast behaviour go back to its queue on stop and are
    handled after start; none is lost and none dead-lettered."""
    sub = subscriber(settings, Held)
    queue = topology.broadcast_queue("sub", sub.instance, Held.name)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        for n in range(5):
            await sub.publish("held.item", {"n": n})
        assert await take(sub.seen, 1) == [0]
        await eventually(lambda: counts_are(admin, settings, queue, ready=0, unacked=5))
        stopping = asyncio.create_task(sub.stop_behaviour(Held.name))
        # Handed back while message 0 is still being handled: the queue must keep them.
        await eventually(lambda: counts_are(admin, settings, queue, ready=4, unacked=1))
        sub.release.set()
        await stopping
        await sub.start_behaviour(Held.name)
        assert sorted(await take(sub.seen, 4)) == [1, 2, 3, 4]
        assert await broker.dead_letters_through_marker() == []


class SecondTime(SubscriberBehaviour):
    """Fails a message's first attempt and handles the second."""

    max_deliveries = 2
    retry_delays = (0.05,)

    @on("second.item")
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait((msg.attempt, msg.delivery_count))
        if msg.attempt == 1:
            raise RuntimeError("first attempt fails")


async def test_hand_backs_do_not_count_as_attempts(settings: Settings) -> None:
    """On RabbitMQ before 4.3 every nack raises a quorum queue's delivery count. A message
    handed back eight times, with ``max_deliveries = 2``, still gets its two attempts."""
    queue = topology.behaviour_queue("sub", SecondTime.name)
    sub = subscriber(settings, SecondTime)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        await sub.stop_behaviour(SecondTime.name)
        await sub.publish("second.item", {})
        channel = await broker.connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        for _ in range(8):
            incoming = await eventually(lambda: declared.get(fail=False))
            await incoming.nack(requeue=True)
        await sub.start_behaviour(SecondTime.name)
        assert await take(sub.seen, 2) == [(1, 8), (2, 0)]
        assert await broker.dead_letters_through_marker() == []
        assert await broker.depth(queue) == 0


class Slow(SubscriberBehaviour):
    """Fails twice; the second retry waits long enough to be seen waiting."""

    retry_delays = (0.05, 60.0)

    @on("slow.item")
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.attempt)
        raise RuntimeError(f"attempt {msg.attempt} fails")


class Bystander(SubscriberBehaviour):
    @on("slow.item")
    @on("after.item")
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.topic)


async def test_a_retry_waits_in_a_delay_queue_and_reaches_only_the_failed_queue(
    settings: Settings,
) -> None:
    """A failed message waits in ``mesh.q.<agent>._retry.<ms>`` (the delay growing per attempt) and
    comes back to the queue it failed in; other subscribers of its topic see it once."""
    failing = subscriber(settings, Slow, agent_id="failing")
    other = subscriber(settings, Bystander, agent_id="other")
    async with running(Gateway(settings=settings), failing, other), peek(settings) as broker:
        await failing.publish("slow.item", {})
        assert await take(failing.seen, 2) == [1, 2]

        async def waiting() -> int:
            try:
                return await broker.depth(topology.retry_queue("failing", 60_000))
            except ChannelNotFoundEntity:
                return 0  # attempt 2's handler has not declared it yet

        await eventually(waiting, timeout=10)
        assert failing.seen.empty()  # attempt 3 is waiting out its 60 s
        await failing.publish("after.item", {})
        # The bystander's queue is FIFO: a second copy of slow.item would come before this.
        assert await take(other.seen, 2) == ["slow.item", "after.item"]
        assert drain(other.seen) == []


class BroadcastBroken(SubscriberBehaviour):
    broadcast = True
    max_deliveries = 3
    retry_delays = (0.02,)

    @on("bb.item")
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.attempt)
        raise ValueError("cannot handle this")


async def test_failing_broadcast_handler_is_dead_lettered_after_max_deliveries(
    settings: Settings,
) -> None:
    """A broadcast behaviour's failing message is tried ``max_deliveries`` times, not
    forever, then dead-lettered with the attempts and the last error."""
    sub = subscriber(settings, BroadcastBroken)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = await sub.publish("bb.item", {"n": 1})
        dead = await broker.dead_letter(message_id)
        reason = str((dead.headers or {})[H_REASON])
        assert f"handler {BroadcastBroken.name}.item failed 3 times" in reason
        assert "ValueError: cannot handle this" in reason
        assert drain(sub.seen) == [1, 2, 3]


async def test_retried_message_keeps_its_sender_and_id(settings: Settings) -> None:
    """The copy that comes back is the same message to the handler: id, sender, topic."""
    seen: list[Message] = []

    class Record(SubscriberBehaviour):
        max_deliveries = 2
        retry_delays = (0.02,)

        @on("rec.item")
        async def item(self, msg: Message, payload: object) -> None:
            seen.append(msg)
            host(self).seen.put_nowait(msg.attempt)
            if msg.attempt == 1:
                raise RuntimeError("once")

    sub = subscriber(settings, Record)
    publisher = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), sub, publisher):
        message_id = await publisher.publish("rec.item", {"k": 1})
        assert await take(sub.seen, 2) == [1, 2]
    first, second = seen
    assert second.message_id == first.message_id == message_id
    assert (second.topic, second.app_id, second.user_id, second.payload) == (
        "rec.item", "pub", first.user_id, {"k": 1},
    )


class Forever(SubscriberBehaviour):
    retry_delays = (1.0,)

    @on("forever.item")
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.attempt)
        raise RuntimeError("always")


async def test_a_retry_whose_queue_is_gone_ends_in_mesh_dead(settings: Settings) -> None:
    """A copy waiting out its delay when its queue is deleted is dead-lettered, not kept
    in the delay queue for ever."""
    sub = subscriber(settings, Forever)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        message_id = await sub.publish("forever.item", {})
        assert await take(sub.seen, 1) == [1]
        await sub.stop_behaviour(Forever.name)
        channel = await broker.connection.channel()
        await channel.queue_delete(topology.behaviour_queue("sub", Forever.name))
        dead = await broker.dead_letter(message_id)
        # What a dead letter from the broker carries (a stream keeps no x-death array).
        assert (dead.headers or {})["x-first-death-queue"] == topology.retry_queue("sub", 1000)


class Picky(SubscriberBehaviour):
    @on("picky.item", model=Order)
    async def item(self, msg: Message, order: Order) -> None: ...


async def test_dead_letters_survive_a_deleted_mesh_dead(settings: Settings) -> None:
    """With ``mesh.dead`` deleted under a running agent, its next dead letter re-declares
    the stream rather than being confirmed into nowhere."""
    sub = subscriber(settings, Picky)
    async with running(Gateway(settings=settings), sub), peek(settings) as broker:
        channel = await broker.connection.channel()
        await channel.queue_delete(topology.DEAD_LETTER_QUEUE)
        message_id = await sub.publish("picky.item", {"item": "tea"})
        await eventually(lambda: exists(broker, topology.DEAD_LETTER_QUEUE))
        dead = await broker.dead_letter(message_id)
        assert "does not match Order" in str((dead.headers or {})[H_REASON])


async def exists(broker: Peek, queue: str) -> bool:
    channel = await broker.connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True
