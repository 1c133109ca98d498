"""Support for the core tests (routing, behaviours, request/reply, control).

Agents here run in the test's own event loop; behaviours report what they handle
through queues on their agent, so tests wait on events rather than on time.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue

from mesh import Agent, Behaviour, Message, Settings, rpc


class Recorder(Agent):
    """An agent whose behaviours report to the test.

    Handlers put ``(behaviour name, message)`` on ``received``; behaviours count things in
    ``counts`` and set ``events`` (created on first use) for the test to wait on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()
        self.counts: Counter[str] = Counter()
        self.events: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


class Slow(Recorder):
    """Serves ``work``: records the request, then answers once the test sets ``release``."""

    @rpc("work")
    async def work(self, msg: Message, payload: object) -> dict[str, str]:
        self.received.put_nowait(("work", msg))
        await self.events["release"].wait()
        return {"from": "slow"}


def recorder(behaviour: Behaviour) -> Recorder:
    """The ``Recorder`` that runs ``behaviour``."""
    agent = behaviour.agent
    assert isinstance(agent, Recorder), f"{behaviour.name} must run in a Recorder"
    return agent


async def take_until(
    queue: asyncio.Queue[tuple[str, Message]], topic: str, timeout: float = 10.0
) -> list[tuple[str, Message]]:
    """Items of ``queue`` up to and including the first whose message has ``topic``."""
    items: list[tuple[str, Message]] = []
    async with asyncio.timeout(timeout):
        while True:
            item = await queue.get()
            items.append(item)
            if item[1].topic == topic:
                return items


class Broker:
    """A plain (not robust) AMQP channel on the test's vhost, for looking at queues.

    aio-pika's robust channel answers a passive declare of a queue it declared itself
    from its cache, so message counts must come from a channel like this one.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and unacked)."""
        declared = await self.channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        assert result.message_count is not None
        return result.message_count

    async def tap(self, exchange: str, pattern: str) -> AbstractQueue:
        """A private queue that gets a copy of what ``exchange`` routes with ``pattern``."""
        queue = await self.channel.declare_queue(exclusive=True)
        await queue.bind(exchange, pattern)
        return queue


@asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    """A ``Broker`` on its own connection to the test's vhost."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield Broker(await connection.channel())
