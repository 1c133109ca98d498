"""Bindings that follow the code: ``reconcile`` against the real broker and Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractQueue
from helpers import eventually, free_port
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mesh.bindings import Binding, BindingLedger, reconcile
from mesh.config import Settings
from mesh.topology import (
    TOPIC_EXCHANGE,
    behaviour_queue_args,
    declare_exchanges,
    declare_shared_queue,
)

QUEUE_ARGS = behaviour_queue_args("quorum", 1000)

A = Binding(TOPIC_EXCHANGE, "orders.created")
B = Binding(TOPIC_EXCHANGE, "orders.renamed-from")
C = Binding(TOPIC_EXCHANGE, "orders.renamed-to")


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A plain channel (with confirms) on the test's vhost, the mesh's exchanges declared."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await declare_exchanges(channel)
        yield channel
    finally:
        await connection.close()


@pytest.fixture
async def queue(channel: AbstractChannel) -> AbstractQueue:
    """A behaviour queue as the mesh declares it, with no topic bindings yet."""
    return await declare_shared_queue(channel, "mesh.q.shop.orders", QUEUE_ARGS)


@pytest.fixture
def ledger(redis: aioredis.Redis, namespace: str) -> BindingLedger:
    return BindingLedger(redis, namespace)


async def routed(channel: AbstractChannel, queue: AbstractQueue, *bindings: Binding) -> list[str]:
    """The routing keys of ``bindings`` whose message, published in this order, reaches ``queue``.

    A marker sent straight to the queue follows them: one channel's messages reach a queue in the
    order published, so what arrives before the marker is all that was routed, and no wait for
    the absent ones is needed.
    """
    exchange = await channel.get_exchange(TOPIC_EXCHANGE, ensure=False)
    for binding in bindings:
        body = binding.routing_key.encode()
        await exchange.publish(aio_pika.Message(body), routing_key=binding.routing_key)
    marker = uuid.uuid4().hex.encode()
    await channel.default_exchange.publish(aio_pika.Message(marker), routing_key=queue.name)
    arrived = []
    while True:
        incoming = await eventually(lambda: queue.get(no_ack=True, fail=False))
        if incoming.body == marker:
            return arrived
        arrived.append(incoming.body.decode())


async def test_reconcile_unbinds_what_the_code_no_longer_declares(
    channel: AbstractChannel, queue: AbstractQueue, ledger: BindingLedger
) -> None:
    """{A, B} then {A, C}: B's key stops reaching the queue, C's starts, A's stays."""
    assert await reconcile(queue, [A, B], ledger) == set()
    assert await routed(channel, queue, A, B, C) == [A.routing_key, B.routing_key]

    assert await reconcile(queue, [A, C], ledger) == {B}

    assert await routed(channel, queue, A, B, C) == [A.routing_key, C.routing_key]
    assert await ledger.recorded(queue.name) == {A, C}


async def test_reconcile_binds_and_goes_on_when_redis_is_down(
    channel: AbstractChannel,
    queue: AbstractQueue,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis unreachable the declared bindings are still made, and nothing is raised."""
    # Nothing listens there: each call fails at once, as at a start while Redis is down.
    unreachable = aioredis.Redis(
        port=free_port(), socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="mesh.bindings"):
            removed = await reconcile(queue, [A, C], BindingLedger(unreachable, namespace))
    finally:
        await unreachable.aclose()

    assert removed == set()
    assert await routed(channel, queue, A, B, C) == [A.routing_key, C.routing_key]
    assert any(
        r.levelno == logging.WARNING and queue.name in r.getMessage() for r in caplog.records
    ), caplog.text


async def test_ledger_keys_live_under_the_namespace(
    queue: AbstractQueue, ledger: BindingLedger, redis: aioredis.Redis, namespace: str
) -> None:
    """One set per queue at ``<namespace>:bindings:<queue>``; no bindings, no key."""
    await reconcile(queue, [A, C], ledger)

    key = f"{namespace}:bindings:{queue.name}"
    assert await redis.keys(f"{namespace}:*") == [key.encode()]
    assert {tuple(json.loads(m)) for m in await redis.smembers(key)} == {A, C}

    assert await reconcile(queue, [], ledger) == {A, C}
    assert await redis.exists(key) == 0


async def test_a_record_may_expire(
    queue: AbstractQueue, ledger: BindingLedger, redis: aioredis.Redis
) -> None:
    """``expires`` puts a TTL on the record, renewed by each start; without it, none."""
    key = ledger.key(queue.name)
    await reconcile(queue, [A], ledger)
    assert await redis.pttl(key) == -1

    await reconcile(queue, [A], ledger, expires=60)
    assert 0 < await redis.pttl(key) <= 60_000


async def test_unbinding_what_the_broker_no_longer_has_does_not_fail(
    channel: AbstractChannel, queue: AbstractQueue, ledger: BindingLedger
) -> None:
    """Recorded bindings already gone from the broker (or whose exchange is) unbind quietly."""
    # Never bound: as if unbound by hand, or their exchange deleted, since the last start.
    gone = {Binding(TOPIC_EXCHANGE, "never.bound"), Binding("mesh.deleted", "orders.#")}
    await ledger.record(queue.name, {A, *gone})

    assert await reconcile(queue, [A], ledger) == gone

    assert not channel.is_closed
    assert await routed(channel, queue, A, B) == [A.routing_key]
    assert await ledger.recorded(queue.name) == {A}


async def test_bindings_on_retired_exchanges_are_forgotten_not_unbound(
    channel: AbstractChannel, queue: AbstractQueue, ledger: BindingLedger
) -> None:
    """A binding an earlier version made on an exchange nothing uses any more (``mesh.requeue``)
    is dropped from the record and left on the broker: a provisioned agent may not touch that
    exchange, and unbinding it would close the channel the queue is consumed on."""
    retired = await channel.declare_exchange("mesh.requeue", aio_pika.ExchangeType.TOPIC)
    old = Binding("mesh.requeue", f"*.{queue.name}")
    await queue.bind(retired, old.routing_key)
    await ledger.record(queue.name, {A, old})

    assert await reconcile(queue, [A], ledger) == {old}

    assert await ledger.recorded(queue.name) == {A}
    await retired.publish(aio_pika.Message(b"still bound"), f"x.{queue.name}")
    incoming = await eventually(lambda: queue.get(no_ack=True, fail=False))
    assert incoming.body == b"still bound"


async def test_two_versions_starting_at_once_leave_the_last_writers_bindings(
    settings: Settings,
    channel: AbstractChannel,
    queue: AbstractQueue,
    ledger: BindingLedger,
    namespace: str,
) -> None:
    """Replicas of old ({A, B}) and new ({A, C}) code reconcile one queue at the same time.

    Each round the broker ends up bound exactly as the ledger says, to one version's set:
    nothing left over from the other version, nothing of the recorded one missing.
    """
    # The other replica: a connection and a Redis client of its own, as in another process.
    other_connection = await aio_pika.connect(settings.amqp_url)
    other_redis = aioredis.from_url(settings.redis_url)
    try:
        other_channel = await other_connection.channel()
        other_queue = await declare_shared_queue(other_channel, queue.name, QUEUE_ARGS)
        other_ledger = BindingLedger(other_redis, namespace)
        for _ in range(5):
            await asyncio.gather(
                reconcile(queue, [A, B], ledger), reconcile(other_queue, [A, C], other_ledger)
            )
            recorded = await ledger.recorded(queue.name)
            assert recorded in ({A, B}, {A, C})
            expected = [b.routing_key for b in (A, B, C) if b in recorded]
            assert await routed(channel, queue, A, B, C) == expected
    finally:
        await other_redis.aclose()
        await other_connection.close()


class PausedAtUnbind:
    """A real queue whose first ``unbind`` waits for ``go`` (to interleave other starts)."""

    def __init__(self, queue: AbstractQueue) -> None:
        self._queue = queue
        self.name = queue.name
        self.at_unbind = asyncio.Event()
        self.go = asyncio.Event()

    async def bind(self, *args: Any, **kwargs: Any) -> Any:
        return await self._queue.bind(*args, **kwargs)

    async def unbind(self, *args: Any, **kwargs: Any) -> Any:
        if not self.go.is_set():
            self.at_unbind.set()
            await self.go.wait()
        return await self._queue.unbind(*args, **kwargs)


async def test_a_record_changed_and_changed_back_meanwhile_makes_a_start_begin_again(
    settings: Settings,
    channel: AbstractChannel,
    queue: AbstractQueue,
    ledger: BindingLedger,
    namespace: str,
) -> None:
    """Start P (new code, {C}) read {A} and bound C; before it unbinds A, another new start
    records {C} and an old replica restarting records {A} again (unbinding C). P must not
    record {C} over that as if nothing happened: its unbinding A would leave the queue bound
    to nothing while the record says {C}. (A compare of the record's value alone misses it.)"""
    await reconcile(queue, [A], ledger)
    other = aioredis.from_url(settings.redis_url)
    try:
        paused = PausedAtUnbind(queue)
        first = asyncio.create_task(
            reconcile(cast(AbstractQueue, paused), [C], BindingLedger(other, namespace))
        )
        await asyncio.wait_for(paused.at_unbind.wait(), 10)
        await reconcile(queue, [C], ledger)
        await reconcile(queue, [A], ledger)
        paused.go.set()
        await asyncio.wait_for(first, 10)
        recorded = await ledger.recorded(queue.name)
        expected = [b.routing_key for b in (A, C) if b in recorded]
        assert expected, recorded
        assert await routed(channel, queue, A, C) == expected, recorded
    finally:
        await other.aclose()
