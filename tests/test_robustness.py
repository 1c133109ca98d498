"""No message is lost when an agent is killed, its connection drops, or it shuts down."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
from agents_reliability import (
    Hold,
    Host,
    agent_process,
    consumers,
    counts_are,
    drain,
    host,
    peek,
    subscriber,
    vhost_of,
)
from agents_robustness import (
    RECORD_TOPIC,
    SLOW_TOPIC,
    Record,
    SlowRecord,
    finished_key,
    processed_key,
    started_key,
)
from helpers import eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Message, PublishError, Settings, on, topology
from mesh.devservices import BrokerAdmin
from mesh.gateway import Gateway

RECORDER = "tests.agents_robustness:Recorder"
SLOW_RECORDER = "tests.agents_robustness:SlowRecorder"


class Collect(SubscriberBehaviour):
    @on("flow.item")
    async def item(self, msg: Message, payload: dict[str, int]) -> None:
        host(self).seen.put_nowait(payload["n"])


async def members(redis: aioredis.Redis, key: str) -> set[str]:
    return {m.decode() for m in await redis.smembers(key)}


async def items(redis: aioredis.Redis, key: str) -> list[str]:
    return [m.decode() for m in await redis.lrange(key, 0, -1)]


async def test_sigkilled_subscriber_loses_no_message(
    settings: Settings, redis: aioredis.Redis, admin: BrokerAdmin, tmp_path: Path
) -> None:
    """SIGKILL mid-stream: a new process handles everything the killed one did not ack."""
    queue = topology.behaviour_queue("rec", Record.name)
    processed = processed_key(settings.namespace)
    publisher = Host("pub", settings=settings)

    async def publish_all() -> list[str]:
        return [await publisher.publish(RECORD_TOPIC, {"n": n}) for n in range(2000)]

    async def processed_at_least(count: int) -> bool:
        return await redis.scard(processed) >= count

    async with running(Gateway(settings=settings), publisher):
        async with agent_process(settings, RECORDER, "rec", tmp_path / "first.log") as first:
            await eventually(lambda: consumers(admin, settings, queue), timeout=30)
            publishing = asyncio.create_task(publish_all())
            try:
                await eventually(lambda: processed_at_least(300), timeout=30)
            finally:
                first.signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
            handled_by_first = await members(redis, processed)
        sent = await asyncio.wait_for(publishing, 60)
        assert len(handled_by_first) < len(sent)
        async with agent_process(settings, RECORDER, "rec", tmp_path / "second.log"):
            await eventually(lambda: processed_at_least(len(sent)), timeout=60)
    assert await members(redis, processed) == set(sent)


async def test_connections_closed_by_the_broker_recover_without_loss(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """Every connection is closed mid-stream: they recover and every confirmed message arrives."""
    sub = subscriber(settings, Collect)
    publisher = Host("pub", settings=settings)
    confirmed: set[int] = set()
    failed: set[int] = set()
    closed = asyncio.Event()

    async def publish() -> None:
        for n in range(1000):
            if n == 900:
                await closed.wait()  # the close must happen while messages still flow
            try:
                await publisher.publish("flow.item", {"n": n})
            except PublishError:
                failed.add(n)
            else:
                confirmed.add(n)

    async with running(Gateway(settings=settings), sub, publisher):
        received: set[int] = set()

        def got(count: int) -> bool:
            received.update(drain(sub.seen))
            return len(received) >= count

        publishing = asyncio.create_task(publish())
        try:
            await eventually(lambda: got(300), timeout=30)
            before = len(await admin.list_connections(vhost_of(settings)))
            await admin.close_connections(vhost_of(settings), "test closes every connection")
            closed.set()
            await asyncio.wait_for(publishing, 90)
        finally:
            publishing.cancel()
        for queue in (topology.GATEWAY_QUEUE, topology.behaviour_queue("sub", Collect.name)):
            await eventually(
                lambda q=queue: consumers(admin, settings, q),
                timeout=30, what=f"{queue} has a consumer again",
            )
        await eventually(lambda: got(1000) and received >= confirmed, timeout=30)
        after = await admin.list_connections(vhost_of(settings))
    assert confirmed | failed == set(range(1000))
    assert failed == set()  # the robust connection came back well within publish_timeout
    assert received == set(range(1000))
    assert len(after) == before


async def test_sigterm_lets_the_running_handler_finish_and_loses_nothing(
    settings: Settings, redis: aioredis.Redis, admin: BrokerAdmin, tmp_path: Path
) -> None:
    """SIGTERM: the in-flight handler finishes and is acked, exit code 0; the rest is requeued."""
    queue = topology.behaviour_queue("slow", SlowRecord.name)
    started, finished = started_key(settings.namespace), finished_key(settings.namespace)
    publisher = Host("pub", settings=settings)
    sent: list[str] = []

    async def finished_all() -> bool:
        return set(await items(redis, finished)) >= set(sent)

    async with running(Gateway(settings=settings), publisher):
        async with agent_process(settings, SLOW_RECORDER, "slow", tmp_path / "first.log") as first:
            await eventually(lambda: consumers(admin, settings, queue), timeout=30)
            sent += [await publisher.publish(SLOW_TOPIC, {"n": n}) for n in range(4)]
            await eventually(lambda: redis.llen(started), timeout=30)
            first.signal(signal.SIGTERM)
            assert await first.wait() == 0, first.output()
        started_by_first = await items(redis, started)
        assert started_by_first[0] == sent[0]
        assert await items(redis, finished) == started_by_first
        async with agent_process(settings, SLOW_RECORDER, "slow", tmp_path / "second.log"):
            await eventually(finished_all, timeout=30)
            await eventually(lambda: counts_are(admin, settings, queue, ready=0, unacked=0))
            # Nothing was handled twice: the first message was acked before the exit.
            assert Counter(await items(redis, started)) == Counter(sent)


async def test_stop_waits_for_the_running_handler_and_acks_its_message(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """``agent.stop()`` during a handler cancels the consumer, waits, and acks the message."""
    queue = topology.behaviour_queue("sub", Hold.name)
    sub = subscriber(settings, Hold)
    async with running(Gateway(settings=settings)), peek(settings) as broker:
        await sub.start()
        message_id = await sub.publish("hold.item", {})
        assert await take(sub.seen, 1) == [("started", message_id)]
        stopping = asyncio.create_task(sub.stop())
        try:
            await eventually(lambda: _no_consumers(admin, settings, queue))
            assert not stopping.done()
            sub.release.set()
            await asyncio.wait_for(stopping, 30)
        finally:
            stopping.cancel()
        assert drain(sub.seen) == [("finished", message_id)]
        assert await broker.depth(queue) == 0


async def _no_consumers(admin: BrokerAdmin, settings: Settings, queue: str) -> bool:
    return await consumers(admin, settings, queue) == 0
