"""Trimming: old records go, signed checkpoints keep verification working."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from audit_support import append_all, chain_entries, keys_of, new_key, next_ms, raw, record, writing

from mesh.audit import AuditTampered, trim, verify_audit
from mesh.audit.streams import chain_key, chains_key, checkpoints_key


async def test_a_trimmed_chain_still_verifies_from_where_it_was_cut(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    keys = keys_of(key)
    async with writing(redis, namespace, key) as writer:
        await append_all(writer, [record(i) for i in range(20)])
        await writer.checkpoint()
        cutoff = await next_ms(redis)
        await append_all(writer, [record(i) for i in range(20, 40)])
        await writer.checkpoint()

        trimmed = await trim(redis, namespace, keys, before_ms=cutoff)
        assert (trimmed.verified, trimmed.removed, trimmed.removed_checkpoints) == (40, 20, 1)
        assert trimmed.retired == []

        report = await verify_audit(redis, namespace, keys)
        assert report.ok, report.problems
        [chain] = report.chains
        assert (chain.begins_after, chain.first_seq, chain.last_seq) == (20, 21, 40)
        # The checkpoint stream was cut too: the one before the cutoff went.
        assert report.checkpoints.begins_after == 1

        # The writer goes on; a second trim carries the cuts forward.
        await append_all(writer, [record(i) for i in range(40, 45)])
        await trim(redis, namespace, keys, before_ms=cutoff)
        report = await verify_audit(redis, namespace, keys)
        assert report.ok, report.problems
        assert report.records == 25

    # The first record kept is still anchored: deleting it is found.
    entries = await chain_entries(redis, namespace, writer.chain)
    await redis.xdel(chain_key(namespace, writer.chain), entries[0][0])
    report = await verify_audit(redis, namespace, keys)
    assert [(p.kind, p.seq) for p in report.problems] == [("deleted", 21)]


async def test_the_chain_of_a_replica_gone_longer_than_keep_is_removed_whole(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    keys = keys_of(key)
    async with writing(redis, namespace, key, replica="idle") as idle:
        async with writing(redis, namespace, key, replica="gone") as gone:
            await append_all(gone, [record(i) for i in range(5)])
            await append_all(idle, [record(i) for i in range(3)])
            cutoff = await next_ms(redis)
        # gone's closing checkpoint, which is kept, saw records that are not.
        async with writing(redis, namespace, key, replica="busy") as busy:
            await append_all(busy, [record(i) for i in range(4)])
            trimmed = await trim(redis, namespace, keys, before_ms=cutoff)
            assert sorted(trimmed.retired) == sorted([gone.chain, idle.chain])
            assert trimmed.removed == 8
            listed = {m.decode() for m in await redis.smembers(chains_key(namespace))}
            assert listed == {busy.chain}
            report = await verify_audit(redis, namespace, keys)
            assert report.ok, report.problems
            assert [r.chain for r in report.chains] == [busy.chain]
            # While a kept checkpoint mentions a chain removed whole, its cut is carried.
            await trim(redis, namespace, keys, before_ms=cutoff)
            report = await verify_audit(redis, namespace, keys)
            assert report.ok, report.problems
            assert gone.chain in report.cuts

            # A writer idle for longer than --keep finds its chain gone and starts another.
            before = idle.chain
            await idle.append(record(99))
            assert idle.chain != before
    report = await verify_audit(redis, namespace, keys)
    assert report.ok, report.problems
    assert sorted(r.records for r in report.chains) == [1, 4]


async def test_a_trail_that_does_not_verify_is_not_trimmed(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    async with writing(redis, namespace, key) as writer:
        await append_all(writer, [record(i) for i in range(6)])
    stream = chain_key(namespace, writer.chain)
    entries = await chain_entries(redis, namespace, writer.chain)
    await redis.xdel(stream, entries[2][0])
    cutoff = await next_ms(redis)
    with pytest.raises(AuditTampered, match="deleted"):
        await trim(redis, namespace, keys_of(key), before_ms=cutoff)
    assert await redis.xlen(stream) == 5
    assert len(await raw(redis, checkpoints_key(namespace))) == 1


async def test_keep_leaves_young_records(redis: aioredis.Redis, namespace: str) -> None:
    key = new_key()
    async with writing(redis, namespace, key) as writer:
        await append_all(writer, [record(i) for i in range(3)])
    trimmed = await trim(redis, namespace, keys_of(key), keep=3600)
    assert (trimmed.removed, trimmed.retired) == (0, [])
    report = await verify_audit(redis, namespace, keys_of(key))
    assert report.ok and report.records == 3, report.problems
