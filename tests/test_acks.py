"""AckBatcher on a real channel: the broker holds unacked exactly what the batcher did not ack.

Each test takes a few deliveries on a channel of its own, settles them through the batcher,
and at the end asks the broker what it still counts unacked on that channel: the consumer
stops, ``basic.recover`` requeues those, and ``basic.get`` fetches them (all on the one
channel, so the broker handles them in that order).  A settle of a tag the broker no longer
knows would close the channel (PRECONDITION_FAILED), and the check would fail with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from helpers import eventually

from mesh.acks import AckBatcher
from mesh.config import Settings
from mesh.transport import reject

QUEUE = "acks.test"


class Deliveries:
    """``count`` messages (bodies ``1`` … ``count``) delivered on a channel of their own."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, queue: AbstractQueue
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.queue = queue
        self.received: list[AbstractIncomingMessage] = []
        self.frames: list[tuple[int, bool]] = []
        """The acks sent on the channel: (delivery tag, multiple)."""
        self.consumer_tag = ""
        self.closes = 0
        self.hold: asyncio.Event | None = None
        """While set here and not set itself, acks wait before they are sent."""

    def __getitem__(self, number: int) -> AbstractIncomingMessage:
        """The delivery of message ``number`` (its first delivery: tag ``number``)."""
        return self.received[number - 1]

    async def batcher(self) -> AckBatcher:
        raw = await self.channel.get_underlay_channel()

        def closed() -> None:
            self.closes += 1

        return AckBatcher(raw, on_closed=closed)

    async def unacked(self) -> list[int]:
        """The messages the broker still counts unacked on the channel (this ends it)."""
        await self.queue.cancel(self.consumer_tag)
        raw = await self.channel.get_underlay_channel()
        await raw.basic_recover(requeue=True)
        found = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            found.append(int(message.body))
        return sorted(found)


@asynccontextmanager
async def deliveries(settings: Settings, count: int) -> AsyncIterator[Deliveries]:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        publisher = await connection.channel(publisher_confirms=True)
        await publisher.declare_queue(QUEUE)
        for number in range(1, count + 1):
            await publisher.default_exchange.publish(aio_pika.Message(b"%d" % number), QUEUE)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=count)
        queue = await channel.declare_queue(QUEUE, passive=True)
        taken = Deliveries(connection, channel, queue)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        sending = raw.basic_ack

        async def recorded(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
            taken.frames.append((delivery_tag, multiple))
            if taken.hold is not None:
                await taken.hold.wait()
            await sending(delivery_tag, multiple=multiple, wait=wait)

        raw.basic_ack = recorded  # type: ignore[method-assign]

        async def take(message: AbstractIncomingMessage) -> None:
            taken.received.append(message)

        taken.consumer_tag = await queue.consume(take)
        await eventually(lambda: len(taken.received) == count)
        assert [m.delivery_tag for m in taken.received] == list(range(1, count + 1))
        assert [int(m.body) for m in taken.received] == list(range(1, count + 1))
        yield taken
    finally:
        await connection.close()


async def next_turns() -> None:
    """Let the event loop run a few turns (a flush is due at the end of one)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_deliveries_handled_in_one_turn_are_acked_with_one_frame(
    settings: Settings,
) -> None:
    """Whatever order they finish in within the turn."""
    async with deliveries(settings, 5) as taken:
        acks = await taken.batcher()
        for number in range(1, 6):
            acks.track(taken[number])
        for number in (5, 2, 4, 1, 3):
            acks.done(taken[number])
        await eventually(lambda: acks.idle)
        assert taken.frames == [(5, True)]
        assert await taken.unacked() == []
    assert acks.lost == 0


async def test_a_delivery_still_handled_is_never_covered(settings: Settings) -> None:
    """Four done behind the first, still in its handler: they are acked alone, and the
    first stays unacked, also once released while its channel is open (someone else
    settles it then)."""
    async with deliveries(settings, 5) as taken:
        acks = await taken.batcher()
        for number in range(1, 6):
            acks.track(taken[number])
        for number in range(2, 6):
            acks.done(taken[number])
        await eventually(lambda: len(taken.frames) == 4)
        acks.release(taken[1])
        await next_turns()
        assert sorted(taken.frames) == [(2, False), (3, False), (4, False), (5, False)]
        assert not acks.idle
        assert await taken.unacked() == [1]


async def test_out_of_order_completion_acks_each_run_once_it_is_whole(
    settings: Settings,
) -> None:
    """The third and fifth finish first and are acked alone; once the first finishes,
    each multiple ack goes up to the next delivery still handled, passing those acked
    alone without settling them again (the channel stays open)."""
    async with deliveries(settings, 5) as taken:
        acks = await taken.batcher()
        for number in range(1, 6):
            acks.track(taken[number])
        acks.done(taken[3])
        acks.done(taken[5])
        await eventually(lambda: len(taken.frames) == 2)
        assert sorted(taken.frames) == [(3, False), (5, False)]
        for number, frame in ((1, (1, True)), (2, (2, True)), (4, (4, True))):
            acks.done(taken[number])
            await eventually(lambda: taken.frames[-1] == frame)  # noqa: B023
        await eventually(lambda: acks.idle)
        assert len(taken.frames) == 5
        assert await taken.unacked() == []
        assert not taken.channel.is_closed


async def test_a_delivery_rejected_in_the_middle_is_settled_alone_and_once(
    settings: Settings,
) -> None:
    """The third is requeued alone between two batches; the batch after it covers its tag
    without settling it again (the channel stays open), and the broker has it back."""
    async with deliveries(settings, 5) as taken:
        acks = await taken.batcher()
        for number in range(1, 6):
            acks.track(taken[number])
        acks.done(taken[1])
        acks.done(taken[2])
        assert await acks.reject(taken[3], requeue=True)
        acks.done(taken[4])
        acks.done(taken[5])
        await eventually(lambda: acks.idle)
        assert taken.frames == [(2, True), (5, True)]
        # Requeued, it came again (tag 6, not the batcher's): unacked, and only it.
        assert await taken.unacked() == [3]
        assert not taken.channel.is_closed
    assert acks.lost == 0


async def test_a_closed_channel_discards_its_batcher(settings: Settings) -> None:
    """The channel closes with one batch's ack on its way and two deliveries done after
    it: none of the three was acked (counted as lost, and the broker has them back), and
    one whose handler ends after the close counts as lost too."""
    async with deliveries(settings, 4) as taken:
        acks = await taken.batcher()
        for number in range(1, 5):
            acks.track(taken[number])
        taken.hold = asyncio.Event()
        acks.done(taken[1])
        await eventually(lambda: taken.frames == [(1, True)])
        acks.done(taken[2])
        acks.done(taken[3])
        await next_turns()  # the batch of 1 is still on its way: 2 and 3 wait for it
        await taken.channel.close()
        await eventually(lambda: acks.closed)
        assert (acks.lost, taken.closes) == (2, 0)
        taken.hold.set()
        await eventually(lambda: taken.closes == 1)
        assert (acks.lost, acks.idle) == (3, True)
        acks.done(taken[4])  # its handler ends after the close
        await next_turns()
        assert acks.lost == 4
        assert taken.frames == [(1, True)]
        checking = await taken.connection.channel()

        async def all_back() -> bool:
            declared = await checking.declare_queue(QUEUE, passive=True)
            return declared.declaration_result.message_count == 4

        await eventually(all_back)


async def test_a_delivery_the_batcher_never_saw_is_never_covered(settings: Settings) -> None:
    """The second delivery is settled outside the batcher: once the third is tracked with
    the second missing, every ack goes alone, and the second's own reject stays valid."""
    async with deliveries(settings, 3) as taken:
        acks = await taken.batcher()
        acks.track(taken[1])
        acks.track(taken[3])
        acks.done(taken[1])
        acks.done(taken[3])
        await eventually(lambda: acks.idle)
        assert sorted(taken.frames) == [(1, False), (3, False)]
        assert await reject(taken[2], requeue=True)
        assert await taken.unacked() == [2]
