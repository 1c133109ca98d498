"""Batched acks: the deliveries a consumer channel's handlers finished, acked together.

An ack is a frame of its own, and each frame a socket write: the gateway's relay paid one
per message besides the publish of its copy.  ``AckBatcher`` instead sends, at the end of
an event-loop turn, one ``basic.ack(multiple=True)`` for everything handled meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractIncomingMessage

from mesh.transport import ack, is_stale, reject

logger = logging.getLogger(__name__)


class AckBatcher:
    """Acks the deliveries of one consumer channel in batches.

    A multiple ack acks every unacked delivery of the channel up to its tag, so one is sent
    only for a tag T such that every tag up to T (above the last batch) was ``track``-ed
    and is ``done`` or was settled alone (``ack``, ``reject``): a delivery still being
    handled, or one the batcher never saw, is never covered.  Deliveries done behind one
    still being handled are acked alone, each with a frame of its own, so that a slow one
    does not hold up the channel's prefetch window.  The broker numbers a channel's
    deliveries 1, 2, 3 …, so the channel must carry one consumer whose deliveries are
    tracked in the order they came; a tag that skips some means the batcher cannot know
    what became of those, and from then on it acks each delivery alone (and says so).

    The acks of one batch are sent before any of the next: a multiple ack must not reach
    the broker before an ack of a tag it covers, or the broker, no longer knowing that
    tag, closes the channel.  For the same reason a delivery settled alone counts as
    settled only once its frame is out, and nothing may settle a delivery after ``done``:
    aio-pika's messages that a multiple ack covered do not know they were acked.

    When the channel closes, the broker requeues whatever was not acked on it: the batcher
    drops what it holds, counting in ``lost`` the handled deliveries whose ack did not go
    out (the broker delivers those again), and calls ``on_closed`` once no ack of it is on
    its way any more.
    """

    def __init__(
        self,
        channel: aiormq.abc.AbstractChannel,
        *,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self.on_closed = on_closed
        self.closed = False
        self.lost = 0
        """Deliveries marked ``done`` whose ack did not go out: their channel closed."""
        self._loop = asyncio.get_running_loop()
        self._handling: dict[int, AbstractIncomingMessage] = {}
        self._done: dict[int, AbstractIncomingMessage] = {}
        self._settled: set[int] = set()
        """Tags above ``_acked`` settled alone, which a later multiple ack may pass."""
        self._acked = 0
        """Every tag up to this one is settled."""
        self._next = 1
        """The tag the next delivery should carry."""
        self._alone = False
        self._flush_due = False
        self._sending: asyncio.Task[None] | None = None
        channel.closing.add_done_callback(self._channel_closed)

    @property
    def idle(self) -> bool:
        """Nothing tracked, and no ack on its way."""
        return not (self._handling or self._done or self._settled or self._sending)

    def track(self, incoming: AbstractIncomingMessage) -> None:
        """``incoming``'s handling starts: no batch covers it until it is settled."""
        if self.closed:
            return  # the broker requeued it with its channel
        tag = _tag(incoming)
        if tag != self._next and not self._alone:
            self._alone = True
            logger.warning(
                "delivery %d of a channel came to the ack batcher when %d was due: acking "
                "each of the channel's deliveries alone from now on",
                tag,
                self._next,
            )
        self._next = max(self._next, tag + 1)
        self._handling[tag] = incoming

    def done(self, incoming: AbstractIncomingMessage) -> None:
        """``incoming`` was handled: acked with the next batch, at the end of this loop turn.
        Nothing may settle it afterwards."""
        if self.closed:
            self.lost += 1
            return
        tag = _tag(incoming)
        if self._handling.pop(tag, None) is None:
            raise ValueError(f"delivery {tag} is not being handled")
        self._done[tag] = incoming
        self._flush_soon()

    async def ack(self, incoming: AbstractIncomingMessage) -> bool:
        """Ack ``incoming`` now, alone; false when its channel closed first."""
        return await self._settle_alone(incoming, ack(incoming))

    async def reject(self, incoming: AbstractIncomingMessage, *, requeue: bool) -> bool:
        """Reject ``incoming`` now, alone; false when its channel closed first."""
        return await self._settle_alone(incoming, reject(incoming, requeue=requeue))

    def release(self, incoming: AbstractIncomingMessage) -> None:
        """``incoming``'s handling ended; nothing to do if it was settled here.

        Otherwise its channel closed (the broker requeued it: it is dropped), or someone
        settles it outside the batcher at a moment the batcher cannot know: then no
        multiple ack passes it until the channel closes.
        """
        tag = _tag(incoming)
        if tag in self._handling and is_stale(incoming):
            self._settle(tag)

    async def _settle_alone(
        self, incoming: AbstractIncomingMessage, settling: Awaitable[bool]
    ) -> bool:
        settled = await settling
        # False means its channel closed, and the close drops it; cancelled, the frame
        # may still be on its way, so it keeps holding back later batches.
        if settled and _tag(incoming) in self._handling:
            self._settle(_tag(incoming))
        return settled

    def _settle(self, tag: int) -> None:
        del self._handling[tag]
        if not self._alone:
            self._settled.add(tag)
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.closed or self._sending is not None:
            return  # a finished send flushes again
        acks: list[tuple[AbstractIncomingMessage, bool, int]] = []
        if not self._alone:
            done, settled, tag = self._done, self._settled, self._acked + 1
            last: AbstractIncomingMessage | None = None
            count = 0
            while True:
                if tag in done:
                    last, count = done.pop(tag), count + 1
                elif tag in settled:
                    settled.remove(tag)
                else:
                    break
                tag += 1
            self._acked = tag - 1
            if last is not None:
                acks.append((last, True, count))
            # Done behind one still handled: acked alone, and passed by a later batch.
            settled.update(done)
        acks += [(incoming, False, 1) for incoming in self._done.values()]
        self._done = {}
        if acks:
            self._sending = self._loop.create_task(self._send(acks))

    async def _send(self, acks: list[tuple[AbstractIncomingMessage, bool, int]]) -> None:
        """Send one batch's acks: (delivery, multiple, deliveries it covers) each."""
        try:
            if len(acks) == 1:
                sent = [await ack(acks[0][0], multiple=acks[0][1])]
            else:
                sent = await asyncio.gather(*(ack(i, multiple=m) for i, m, _ in acks))
        finally:
            self._sending = None
        self.lost += sum(count for (_, _, count), ok in zip(acks, sent, strict=True) if not ok)
        if self.closed:
            self._report_closed()
        elif self._done or self._settled:
            self._flush_soon()

    def _channel_closed(self, _: object) -> None:
        if self.closed:
            return
        self.closed = True
        self.lost += len(self._done)
        self._handling.clear()
        self._done.clear()
        self._settled.clear()
        if self._sending is None:
            self._report_closed()

    def _report_closed(self) -> None:
        if self.on_closed is not None:
            self.on_closed()


def _tag(incoming: AbstractIncomingMessage) -> int:
    tag = incoming.delivery_tag
    if tag is None:
        raise ValueError("a delivery consumed without acks cannot be acked")
    return tag
