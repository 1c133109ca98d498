"""Typed state with compare-and-set against a real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis import Redis as SyncRedis

from mesh.devservices import Services
from mesh.state import (
    InvalidState,
    StateConflict,
    StateError,
    StateStore,
    StateUnavailable,
    Versioned,
    state_key,
)

ROOT = Path(__file__).resolve().parent.parent


class Counter(BaseModel):
    count: int = 0
    label: str = "none"
    seen: list[str] = Field(default_factory=list)


class Required(BaseModel):
    name: str
    size: int
    note: str = ""


@pytest.fixture
def redis_url(services: Services) -> str:
    """Where the suite's Redis answers, for the clients a test opens itself."""
    return services.settings.redis_url


@pytest.fixture
def store(redis: aioredis.Redis, namespace: str) -> StateStore:
    return StateStore(redis, namespace)


def test_keys() -> None:
    assert state_key("ns", "v7") == "ns:state:v7"
    assert state_key("ns", "v7", "watch") == "ns:state:v7:watch"
    assert StateStore(aioredis.Redis(), "ns").key("v7", "watch") == "ns:state:v7:watch"
    with pytest.raises(ValueError):
        state_key("ns", "a:b")


async def test_missing_state_is_defaults_at_version_0(store: StateStore) -> None:
    got = await store.load(store.key("a"), Counter)
    assert got == Versioned(Counter(), 0)


async def test_missing_state_without_defaults_names_the_fields(store: StateStore) -> None:
    with pytest.raises(InvalidState, match=r"Required.*name, size"):
        await store.load(store.key("a"), Required)
    # a mapping that supplies the required fields can still create it
    saved = await store.update(store.key("a"), Required, {"name": "x", "size": 1})
    assert saved == Versioned(Required(name="x", size=1), 1)
    with pytest.raises(InvalidState, match="Required"):
        await store.update(store.key("b"), Required, lambda r: {"size": 2})


async def test_update_then_load_restores_value_and_version(
    store: StateStore, redis: aioredis.Redis, namespace: str
) -> None:
    key = store.key("a", "beh")
    first = await store.update(key, Counter, {"count": 5, "label": "x"})
    assert first == Versioned(Counter(count=5, label="x"), 1)
    second = await store.update(key, Counter, lambda c: c.model_copy(update={"seen": ["p"]}))
    assert second.version == 2
    assert second.value == Counter(count=5, label="x", seen=["p"])

    # a fresh store (as after a restart) reads back the same
    again = StateStore(redis, namespace)
    assert await again.load(key, Counter) == second
    # stored form: version and the JSON dump
    stored = await redis.hgetall(key)
    assert stored[b"v"] == b"2"
    assert Counter.model_validate_json(stored[b"data"]) == second.value


async def test_update_with_current_skips_the_read_and_retries_when_stale(
    store: StateStore,
) -> None:
    key = store.key("a")
    start = await store.update(key, Counter, {"count": 1})
    await store.update(key, Counter, {"label": "other writer"})
    # `start` is stale now: the change is re-applied to the fresh value
    done = await store.update(key, Counter, lambda c: {"count": c.count + 1}, current=start)
    assert done == Versioned(Counter(count=2, label="other writer"), 3)


async def test_invalid_update_raises_and_writes_nothing(
    store: StateStore, redis: aioredis.Redis
) -> None:
    key = store.key("a")
    await store.update(key, Counter, {"count": 1})
    with pytest.raises(InvalidState, match="count") as info:
        await store.update(key, Counter, {"count": "many"})
    assert isinstance(info.value, ValueError) and isinstance(info.value, StateError)
    with pytest.raises(InvalidState, match="count"):
        await store.update(key, Counter, lambda c: {"count": [1]})

    def mutate(c: Counter) -> Counter:
        c.count = "lots"  # type: ignore[assignment]
        return c

    with pytest.raises(InvalidState, match="count"):
        await store.update(key, Counter, mutate)
    with pytest.raises(InvalidState, match="'cuont'"):
        await store.update(key, Counter, {"cuont": 2})
    with pytest.raises(TypeError):
        await store.update(key, Counter, lambda c: 3)  # type: ignore[arg-type,return-value]
    assert await store.load(key, Counter) == Versioned(Counter(count=1), 1)
    assert await redis.hget(key, "v") == b"1"
    # and nothing at all for a key never written
    with pytest.raises(InvalidState):
        await store.update(store.key("b"), Counter, {"count": "x"})
    assert await redis.exists(store.key("b")) == 0


async def test_stored_value_that_no_longer_fits_the_model(
    store: StateStore, redis: aioredis.Redis
) -> None:
    key = store.key("a")
    await redis.hset(key, mapping={"v": 3, "data": '{"count": "not a number"}'})
    with pytest.raises(InvalidState, match=r"does not fit Counter.*count"):
        await store.load(key, Counter)


async def increment(store: StateStore, key: str, times: int) -> None:
    for _ in range(times):
        await store.update(key, Counter, lambda c: {"count": c.count + 1})


async def test_concurrent_tasks_lose_no_update(store: StateStore) -> None:
    key = store.key("a")
    await asyncio.gather(increment(store, key, 1000), increment(store, key, 1000))
    assert await store.load(key, Counter) == Versioned(Counter(count=2000), 2000)


async def test_two_clients_lose_no_update(
    redis: aioredis.Redis, namespace: str, redis_url: str
) -> None:
    other = aioredis.Redis.from_url(redis_url)
    try:
        one, two = StateStore(redis, namespace), StateStore(other, namespace)
        key = one.key("a")
        await asyncio.gather(increment(one, key, 1000), increment(two, key, 1000))
        assert await one.load(key, Counter) == Versioned(Counter(count=2000), 2000)
    finally:
        await other.aclose()


async def test_writers_in_a_loop_are_not_starved(
    redis: aioredis.Redis, namespace: str, redis_url: str
) -> None:
    # Each writer passes the value it last wrote, so its next write leaves the moment its reply
    # lands; without priority for a loser, one writer would win every race.
    other = aioredis.Redis.from_url(redis_url)
    stores = [StateStore(redis, namespace), StateStore(other, namespace)]
    key = stores[0].key("a")

    async def chain(store: StateStore) -> None:
        current = await store.load(key, Counter)
        for _ in range(1000):
            current = await store.update(
                key, Counter, lambda c: {"count": c.count + 1}, current=current
            )

    try:
        await asyncio.gather(*(chain(s) for s in stores), chain(stores[0]))
        assert await stores[0].load(key, Counter) == Versioned(Counter(count=3000), 3000)
        # no claim left standing
        assert sorted(await redis.hkeys(key)) == [b"data", b"v", b"w"]
    finally:
        await other.aclose()


_WORKER = """
import asyncio, sys
import redis.asyncio as aioredis
from pydantic import BaseModel
from mesh.state import StateStore

class Counter(BaseModel):
    count: int = 0

async def main(url: str, namespace: str, times: int) -> None:
    client = aioredis.Redis.from_url(url)
    store = StateStore(client, namespace)
    for _ in range(times):
        await store.update(store.key("a"), Counter, lambda c: {"count": c.count + 1})
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_lose_no_update(
    store: StateStore, namespace: str, redis_url: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            redis_url,
            namespace,
            "1000",
            env=env,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        # a worker left running would write after the namespace is cleaned up
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    got = await store.load(store.key("a"), Counter)
    assert got.value.count == 2000 and got.version == 2000


async def test_gives_up_after_max_attempts(
    store: StateStore, redis: aioredis.Redis, redis_url: str
) -> None:
    key = store.key("a")
    start = await store.update(key, Counter, {"count": 1})
    meddler = SyncRedis.from_url(redis_url)

    def change(c: Counter) -> dict[str, int]:
        # another writer gets in between every read and write of ours
        meddler.hincrby(key, "v", 1)
        return {"count": c.count + 1}

    try:
        with pytest.raises(StateConflict, match="3 attempts"):
            await store.update(key, Counter, change, current=start, max_attempts=3)
    finally:
        meddler.close()
    assert (await store.load(key, Counter)).value.count == 1
    # the loser claimed priority on the way; giving up must not leave the claim standing
    assert sorted(await redis.hkeys(key)) == [b"data", b"v", b"w"]


async def test_unreachable_redis_raises_state_unavailable() -> None:
    client = aioredis.Redis.from_url("redis://:s3cret-pass@127.0.0.1:1/0", socket_connect_timeout=1)
    store = StateStore(client, "ns")
    try:
        with pytest.raises(StateUnavailable) as info:
            await store.load(store.key("a"), Counter)
        assert "127.0.0.1:1" in str(info.value)
        assert "s3cret" not in str(info.value)
        with pytest.raises(StateUnavailable, match=r"127\.0\.0\.1:1") as info:
            await store.update(store.key("a"), Counter, {"count": 1})
        assert "s3cret" not in str(info.value)
    finally:
        await client.aclose()
