"""Reading the trail: all chains in time order, filtered, and followed as records come."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from audit_support import append_all, new_key, next_ms, record, writing

from mesh.audit import AuditEntry, AuditFilter, AuditReader, Finding


async def test_records_of_all_chains_come_in_time_order_and_filtered(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    reader = AuditReader(redis, namespace)
    async with (
        writing(redis, namespace, key, replica="a") as a,
        writing(redis, namespace, key, replica="b") as b,
    ):
        await append_all(a, [record(0, message_id="a0")])
        await append_all(b, [record(1, message_id="b1")])
        since = await next_ms(redis)
        await append_all(a, [record(2, message_id="a2", principal="monitor")])
        denied = record(
            3,
            message_id="b3",
            decision="denied",
            stage="authorize",
            reason="no rule",
            topic="vehicle.v3.debug.trace",
            findings=(Finding(kind="email", path="$.owner"),),
        )
        await append_all(b, [denied])

    every = [e.record.message_id async for e in reader.entries()]
    assert every == ["a0", "b1", "a2", "b3"]
    newest = [e.record.message_id async for e in reader.entries(newest_first=True, limit=3)]
    assert newest == ["b3", "a2", "b1"]
    assert [e.record.message_id for e in await reader.last(2)] == ["a2", "b3"]
    assert [e.record.message_id async for e in reader.entries(since_ms=since)] == ["a2", "b3"]
    assert [e.record.message_id async for e in reader.entries(until_ms=since)] == ["a0", "b1"]

    async def ids(where: AuditFilter) -> list[str | None]:
        return [e.record.message_id async for e in reader.entries(where)]

    assert await ids(AuditFilter(principal="monitor")) == ["a2"]
    assert await ids(AuditFilter(decision="denied")) == ["b3"]
    assert await ids(AuditFilter(topic="vehicle.*.debug.#")) == ["b3"]
    assert await ids(AuditFilter(agent="v1")) == ["b1"]
    [found] = [e async for e in reader.entries(AuditFilter(decision="denied"))]
    assert found.chain == b.chain and found.seq == 2
    assert found.as_dict()["record"]["findings"] == [{"kind": "email", "path": "$.owner"}]

    chains = await reader.chains()
    assert [(c.chain, c.records, c.last_seq) for c in chains] == sorted(
        [(a.chain, 2, 2), (b.chain, 2, 2)]
    )


async def test_follow_brings_new_records_of_new_chains_too(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    reader = AuditReader(redis, namespace)
    async with writing(redis, namespace, key, replica="a") as a:
        await a.append(record(0, message_id="old", decision="denied"))
        seen: asyncio.Queue[AuditEntry] = asyncio.Queue()

        since = await next_ms(redis)
        await a.append(record(1, message_id="before", decision="denied"))

        async def follow() -> None:
            async for entry in reader.follow(AuditFilter(decision="denied"), since_ms=since):
                await seen.put(entry)

        following = asyncio.create_task(follow())
        try:
            entry = await asyncio.wait_for(seen.get(), 10)
            assert entry.record.message_id == "before"
            await a.append(record(1, message_id="first", decision="denied"))
            entry = await asyncio.wait_for(seen.get(), 10)
            assert entry.record.message_id == "first"
            async with writing(redis, namespace, key, replica="b") as b:
                await b.append(record(2, message_id="skipped"))
                await b.append(record(3, message_id="from-b", decision="denied"))
                entry = await asyncio.wait_for(seen.get(), 10)
                assert (entry.chain, entry.record.message_id) == (b.chain, "from-b")
        finally:
            following.cancel()
    assert seen.empty()
