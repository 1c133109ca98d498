"""The fault-injecting TCP proxy of tests/proxy.py, checked against the real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from helpers import eventually
from proxy import Proxy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mesh.devservices import Services


@pytest.fixture
async def proxy(services: Services) -> AsyncIterator[Proxy]:
    async with Proxy.for_url(services.settings.redis_url) as proxy:
        yield proxy


PROXIED = "proxied-test-client"
"""The name the proxied client gives its connections: other programs use the server too."""


def through(proxy: Proxy, services: Services, socket_timeout: float = 30.0) -> aioredis.Redis:
    """A client to the suite's Redis by way of ``proxy``, which never retries by itself."""
    return aioredis.Redis.from_url(
        proxy.url_for(services.settings.redis_url),
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        client_name=f"{PROXIED}-{proxy.port}",
    )


async def server_ids(redis: aioredis.Redis, proxy: Proxy) -> set[int]:
    """The ids of the connections the Redis server holds for the client behind ``proxy``."""
    name = f"{PROXIED}-{proxy.port}"
    return {int(c["id"]) for c in await redis.client_list() if c.get("name") == name}


def test_url_for_needs_a_started_proxy_and_a_port() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        Proxy("127.0.0.1", 6379).url_for("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError):
        Proxy.for_url("redis:///tmp/redis.sock")


async def test_forwards_and_rewrites_urls(proxy: Proxy, services: Services) -> None:
    assert proxy.url_for("redis://:pw@localhost:6379/3?x=1") == (
        f"redis://:pw@127.0.0.1:{proxy.port}/3?x=1"
    )
    client = through(proxy, services)
    try:
        assert await client.ping() is True
        assert proxy.accepted == 1
    finally:
        await client.aclose()


async def test_delayed_reply_arrives_after_the_server_acted(
    proxy: Proxy, services: Services, redis: aioredis.Redis, namespace: str
) -> None:
    key = f"{namespace}:delayed"
    client = through(proxy, services)
    try:
        await client.ping()
        proxy.delay_replies(60)
        write = asyncio.create_task(client.set(key, "1"))
        # the request went through: the server has done it ...
        await eventually(lambda: redis.exists(key))
        # ... and the reply is still held back
        assert not write.done()
        proxy.delay_replies(0)
        assert await asyncio.wait_for(write, 10) is True
        # and with no delay, replies flow at once again
        assert await client.get(key) == b"1"
    finally:
        await client.aclose()


async def test_silence_keeps_the_server_side_open(
    proxy: Proxy, services: Services, redis: aioredis.Redis
) -> None:
    client = through(proxy, services, socket_timeout=0.3)
    try:
        old_id = await client.client_id()
        proxy.silence()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        # the client gave up on its connection; the server still holds it
        assert old_id in await server_ids(redis, proxy)
        # a new connection is accepted but never reaches the server
        before = await server_ids(redis, proxy)
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        assert proxy.accepted == 2
        assert await server_ids(redis, proxy) == before

        proxy.resume()
        assert await client.ping() is True
        assert proxy.accepted == 3
        # the connection silenced earlier stays so
        assert old_id in await server_ids(redis, proxy)
    finally:
        await client.aclose()
    await proxy.close()
    await eventually(lambda: _gone(redis, old_id), what="the server sees the proxy close")


async def test_drop_clients_leaves_the_server_side_open(
    proxy: Proxy, services: Services, redis: aioredis.Redis
) -> None:
    client = through(proxy, services)
    try:
        old_id = await client.client_id()
        proxy.drop_clients()

        async def reconnected() -> int | None:
            try:
                return await client.client_id()
            except RedisConnectionError:
                return None  # the dead connection, noticed only on use

        # the client notices the closed socket and connects again ...
        new_id = await eventually(reconnected)
        assert new_id != old_id
        assert proxy.accepted == 2
        # ... while the server still believes the old connection alive
        assert {old_id, new_id} <= await server_ids(redis, proxy)
    finally:
        await client.aclose()


async def _gone(redis: aioredis.Redis, client_id: int) -> bool:
    return client_id not in {int(c["id"]) for c in await redis.client_list()}
