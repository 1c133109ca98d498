"""State writes over a faulty path to the real Redis (tests/proxy.py between client and server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import eventually
from proxy import Proxy
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mesh import Agent, Settings
from mesh.devservices import Services
from mesh.state import StateStore, StateUnavailable, Versioned

ROOT = Path(__file__).resolve().parent.parent


class Counter(BaseModel):
    count: int = 0


@pytest.fixture
async def proxy(services: Services) -> AsyncIterator[Proxy]:
    async with Proxy.for_url(services.settings.redis_url) as proxy:
        yield proxy


async def at_version(redis: aioredis.Redis, key: str, version: int) -> bool:
    return int(await redis.hget(key, "v") or 0) == version


async def late_reply_retried(
    proxy: Proxy, services: Services, redis: aioredis.Redis, namespace: str, *, meddle: bool
) -> Versioned[Counter]:
    """Increment a counter at 1 whose reply comes late, so that redis-py sends it again.

    With ``meddle``, another writer increments it between our write and redis-py's retry.
    """
    # Retrying on a timeout, as redis-py's Redis(...) does by default (ten times): the retry
    # re-sends the very same EVALSHA on a new connection.
    client = aioredis.Redis.from_url(
        proxy.url_for(services.settings.redis_url), socket_timeout=0.5, retry=Retry(NoBackoff(), 3)
    )
    store = StateStore(client, namespace)
    key = store.key("a")
    try:
        # also loads the script and opens the connection, so only the write's reply is held
        start = await store.update(key, Counter, {"count": 1})
        proxy.delay_replies(60)
        write = asyncio.create_task(
            store.update(key, Counter, lambda c: {"count": c.count + 1}, current=start)
        )
        await eventually(lambda: at_version(redis, key, 2), what="the write is applied")
        await eventually(lambda: proxy.accepted == 2, what="redis-py reconnects to retry")
        if meddle:
            await StateStore(redis, namespace).update(
                key, Counter, lambda c: {"count": c.count + 1}
            )
        proxy.delay_replies(0)
        return await asyncio.wait_for(write, 10)
    finally:
        await client.aclose()


async def test_a_write_whose_reply_was_late_is_applied_once(
    proxy: Proxy, services: Services, redis: aioredis.Redis, namespace: str
) -> None:
    done = await late_reply_retried(proxy, services, redis, namespace, meddle=False)
    assert done == Versioned(Counter(count=2), 2)
    direct = StateStore(redis, namespace)
    assert await direct.load(direct.key("a"), Counter) == done


async def test_a_late_copy_is_recognised_after_others_wrote_on_top(
    proxy: Proxy, services: Services, redis: aioredis.Redis, namespace: str
) -> None:
    done = await late_reply_retried(proxy, services, redis, namespace, meddle=True)
    # ours and the other writer's increment, each once; and the value returned is what is stored
    assert done == Versioned(Counter(count=3), 3)
    direct = StateStore(redis, namespace)
    assert await direct.load(direct.key("a"), Counter) == done


class Counted(Agent):
    state_model = Counter


@pytest.mark.parametrize("query", ["", "?retry_on_timeout=yes"])
async def test_a_silent_redis_fails_a_state_call_in_one_attempt(
    proxy: Proxy, services: Services, namespace: str, query: str
) -> None:
    # An agent's own client, even where its URL asks redis-py to retry on timeouts: each retry
    # would wait a timeout more, on a new connection.
    settings = Settings.from_env(
        amqp_url=services.settings.amqp_url,
        redis_url=proxy.url_for(services.settings.redis_url) + query,
        namespace=namespace,
        heartbeat_interval=0.3,
    )
    agent = Counted("silent", settings=settings)
    try:
        await agent.update_state(count=1)
        assert proxy.accepted == 1
        proxy.silence()
        with pytest.raises(StateUnavailable, match="may have been applied"):
            await agent.update_state(count=2)
        assert proxy.accepted == 1, "the write was retried on a new connection"
        # a call that has to connect first gets one connection, whose handshake times out
        with pytest.raises(StateUnavailable):
            await agent.state_store.load(agent.state_store.key("silent"), Counter)
        assert proxy.accepted == 2
    finally:
        await agent.redis.aclose()


async def test_a_silent_redis_fails_a_registry_query_of_the_command_in_one_attempt(
    proxy: Proxy, services: Services, namespace: str
) -> None:
    proxy.silence()
    url = proxy.url_for(services.settings.redis_url)
    # asks redis-py to retry on timeouts, and to time out soon
    url += "?retry_on_timeout=yes&socket_timeout=0.3&socket_connect_timeout=0.3"
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        "agents",
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MESH_REDIS_URL": url,
            "MESH_NAMESPACE": namespace,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(command.communicate(), 60)
    assert command.returncode == 1
    assert "Redis unreachable" in err.decode()
    assert proxy.accepted == 1, "the query was retried on a new connection"
