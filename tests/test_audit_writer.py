"""The audit writer: records stored in order, batched, per replica; no secret in Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from audit_support import chain_entries, keys_of, new_key, raw, record, writing
from helpers import free_port
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mesh.audit import AuditError, AuditRecord, AuditUnavailable, AuditWriter, verify_audit
from mesh.audit.link import seal
from mesh.audit.streams import chain_key, chains_key, checkpoints_key
from mesh.config import Settings


class CountingRedis(aioredis.Redis):
    """A real Redis client that counts the scripts it runs (one per append round trip)."""

    scripts = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args and str(args[0]).upper() in ("EVALSHA", "EVAL"):
            self.scripts += 1
        return await super().execute_command(*args, **options)


async def test_concurrent_appends_share_round_trips_and_keep_their_order(
    redis: aioredis.Redis, namespace: str, mesh_base_settings: Settings
) -> None:
    counting = CountingRedis.from_url(mesh_base_settings.redis_url)
    key = new_key()
    try:
        async with writing(counting, namespace, key, checkpoint_interval=3600) as writer:
            before = counting.scripts
            ids = await asyncio.gather(*(writer.append(record(i)) for i in range(300)))
            trips = counting.scripts - before
            chain = writer.chain
    finally:
        await counting.aclose()
    assert trips < 10, f"300 concurrent appends took {trips} round trips"
    assert writer.appended == 300
    stored = await chain_entries(redis, namespace, chain)
    assert [entry_id for entry_id, _ in stored] == ids  # each append got its own entry's id
    assert [int(f[b"seq"]) for _, f in stored] == list(range(1, 301))
    # Chain order is the order append was called in.
    assert [json.loads(f[b"data"])["message_id"] for _, f in stored] == [
        f"m{i:04d}" for i in range(300)
    ]
    report = await verify_audit(redis, namespace, keys_of(key))
    assert report.ok, report.problems
    assert report.records == 300


async def test_two_replicas_appending_at_once_verify_clean(
    redis: aioredis.Redis, namespace: str
) -> None:
    key = new_key()
    async with (
        writing(redis, namespace, key, replica="gw-a") as a,
        writing(redis, namespace, key, replica="gw-b") as b,
    ):

        async def burst(writer: AuditWriter, base: int) -> None:
            for round_ in range(5):
                await asyncio.gather(
                    *(writer.append(record(base + round_ * 100 + i)) for i in range(100))
                )

        await asyncio.gather(burst(a, 0), burst(b, 1000))
        # A checkpoint while both run ties the chains together.
        await a.checkpoint()
        chains = {a.chain, b.chain}
    report = await verify_audit(redis, namespace, keys_of(key))
    assert report.ok, report.problems
    assert {r.chain for r in report.chains} == chains
    assert [r.records for r in report.chains] == [500, 500]
    # The one taken above, and b's as it closed (a appended nothing after its own).
    assert report.checkpoints.records == 2
    listed = {m.decode() for m in await redis.smembers(chains_key(namespace))}
    assert listed == chains


async def test_no_secret_reaches_redis_or_the_logs(
    redis: aioredis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    caplog.set_level(logging.DEBUG)
    async with writing(redis, namespace, key) as writer:
        await asyncio.gather(*(writer.append(record(i)) for i in range(20)))
        await writer.checkpoint()
        assert key not in repr(writer)
    stored = await raw(redis, checkpoints_key(namespace))
    stored += await chain_entries(redis, namespace, writer.chain)
    assert len(stored) == 21  # the closing writer had nothing new to checkpoint
    secrets = (key.encode(), key.encode().hex().encode(), key[:16].encode())
    for _, fields in stored:
        for value in [*fields.keys(), *fields.values()]:
            assert not any(s in value for s in secrets)
    assert key not in caplog.text


def test_a_record_holds_no_field_it_does_not_declare() -> None:
    """Findings are kinds and paths; a value cannot ride along."""
    with pytest.raises(ValueError, match="value"):
        AuditRecord.model_validate(
            {
                "decision": "redacted",
                "topic": "patients.admitted",
                "findings": [{"kind": "email", "path": "$.email", "value": "a@b.c"}],
            }
        )


async def test_an_append_redis_did_not_take_fails(namespace: str) -> None:
    unreachable = aioredis.Redis(
        port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    writer = AuditWriter(unreachable, namespace, "gw", new_key(), "k1")
    with pytest.raises(AuditError, match="not running"):
        await writer.append(record(0))
    await writer.start()
    try:
        with pytest.raises(AuditUnavailable, match="not stored"):
            await writer.append(record(0))
    finally:
        await writer.close()
        await unreachable.aclose()
    assert writer.appended == 0


async def test_a_writer_whose_chain_changed_goes_on_in_a_new_one(
    redis: aioredis.Redis, namespace: str
) -> None:
    """A flush whose reply was lost may have landed: the writer never guesses a seq."""
    key = new_key()
    async with writing(redis, namespace, key) as writer:
        await writer.append(record(0))
        first = writer.chain
        # What a landed but unanswered flush leaves: the chain goes on past the writer's tip.
        stream = chain_key(namespace, first)
        [(_, tip)] = await chain_entries(redis, namespace, first)
        data = record(1).dump()
        mac = seal(key.encode(), stream, 2, prev=tip[b"mac"].decode(), kid="k1", data=data)
        landed = {"seq": 2, "prev": tip[b"mac"], "kid": "k1", "mac": mac, "data": data}
        await redis.xadd(stream, landed)  # type: ignore[arg-type]
        await writer.append(record(2))
        assert writer.chain != first
        assert writer.chain.startswith("gw.")
    stored = await chain_entries(redis, namespace, writer.chain)
    assert [int(f[b"seq"]) for _, f in stored] == [1]
    report = await verify_audit(redis, namespace, keys_of(key))
    assert report.ok, report.problems
    assert sorted(r.records for r in report.chains) == [1, 2]
