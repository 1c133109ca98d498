"""The transport's confirming publisher: a refused publish fails only itself."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aio_pika
import pytest
from agents_reliability import user_of, vhost_of
from aio_pika.abc import AbstractChannel, AbstractQueue
from helpers import eventually

from mesh import Settings
from mesh.devservices import BrokerAdmin
from mesh.transport import PublishError, Transport

EXCHANGE = "test.fanout"
QUEUE = "test.sink"
MISSING = "test.no-such-exchange"
FORBIDDEN = "test.forbidden"


@pytest.fixture
async def plain(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A channel of a separate plain connection, for declaring and counting."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield await connection.channel()


async def bound_queue(channel: AbstractChannel) -> AbstractQueue:
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.FANOUT)
    await channel.declare_exchange(FORBIDDEN, aio_pika.ExchangeType.FANOUT)
    queue = await channel.declare_queue(QUEUE)
    await queue.bind(exchange)
    return queue


async def forbid_writes_to(admin: BrokerAdmin, settings: Settings, exchange: str) -> None:
    """Let the test's user write everywhere on its vhost except to ``exchange``."""
    permission = {
        "user": user_of(settings),
        "vhost": vhost_of(settings),
        "configure": ".*",
        "write": f"^(?!{re.escape(exchange)}$).*",
        "read": ".*",
    }
    # Through stdin: rabbitmqctl's arguments may not carry the regex's "$".
    await admin.ctl(
        "-q", "import_definitions", "--format", "json",
        stdin=json.dumps({"permissions": [permission]}).encode(),
    )


async def bodies(queue: AbstractQueue, count: int) -> list[bytes]:
    """Every body in ``queue`` once at least ``count`` messages sit in it."""

    async def ready() -> bool:
        declared = await queue.channel.declare_queue(queue.name, passive=True)
        return (declared.declaration_result.message_count or 0) >= count

    await eventually(ready, what=f"{count} messages in {queue.name}")
    seen = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        seen.append(message.body)
    return seen


@pytest.mark.parametrize(
    ("target", "reason"), [(MISSING, "NOT_FOUND"), (FORBIDDEN, "ACCESS_REFUSED")]
)
async def test_one_refused_publish_fails_only_itself(
    settings: Settings, admin: BrokerAdmin, plain: AbstractChannel, target: str, reason: str
) -> None:
    """40 concurrent publishes, one of them refused (no such exchange; no write permission):
    the broker closes the shared channel for it, yet only that one raises, the other 39 are
    confirmed and delivered, and the connection (with everything else on it) stays up."""
    queue = await bound_queue(plain)
    await forbid_writes_to(admin, settings, FORBIDDEN)
    transport = Transport(settings, "test-transport")
    await transport.connect()
    try:
        connections = (transport.connection, transport.publishing)
        before = [c.transport.connection for c in connections if c.transport is not None]
        culprit = 17

        async def send(n: int) -> None:
            exchange = target if n == culprit else EXCHANGE
            await transport.publish(exchange, f"key.{n}", aio_pika.Message(str(n).encode()))

        results = await asyncio.gather(*(send(n) for n in range(40)), return_exceptions=True)

        failures = {n: r for n, r in enumerate(results) if r is not None}
        assert list(failures) == [culprit], failures
        refusal = failures[culprit]
        assert isinstance(refusal, PublishError)
        assert f"{target}/key.{culprit}" in str(refusal)
        assert reason in str(refusal)
        delivered = await bodies(queue, 39)
        # Confirms are at-least-once: a message whose confirm the channel's close took
        # is sent again and may arrive twice; none may be missing.
        assert set(delivered) == {str(n).encode() for n in range(40) if n != culprit}
        # The refusal did not cost a connection (RabbitMQ closes one with 504 for a publish
        # after a channel's close-ok, or an open before it), and publishing goes on.
        after = [c.transport.connection for c in connections if c.transport is not None]
        assert after == before
        assert not any(c.is_closed for c in after)
        await transport.publish(EXCHANGE, "after", aio_pika.Message(b"after"))
        assert await bodies(queue, 1) == [b"after"]
    finally:
        await transport.close()
