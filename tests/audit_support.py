"""What the audit tests share: keys, records, writers, and raw access to the streams."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from helpers import eventually

from mesh import Settings
from mesh.audit import AuditEntry, AuditKeys, AuditReader, AuditRecord, AuditWriter
from mesh.audit.link import as_page
from mesh.audit.streams import chain_key

Entry = tuple[str, dict[bytes, bytes]]


def new_key() -> str:
    return secrets.token_hex(32)


def record(i: int, **fields: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "decision": "allowed",
        "principal": "vehicles",
        "user": "mesh.vehicles",
        "agent": f"v{i % 3}",
        "instance": "i1",
        "type": "event",
        "topic": f"vehicle.v{i % 3}.speed",
        "message_id": f"m{i:04d}",
        "payload_sha256": "ab" * 32,
    }
    return AuditRecord(**(values | fields))


@asynccontextmanager
async def writing(
    redis: aioredis.Redis,
    namespace: str,
    key: str,
    key_id: str = "k1",
    replica: str = "gw",
    **options: Any,
) -> AsyncIterator[AuditWriter]:
    """A started writer, closed (with its last checkpoint) afterwards."""
    writer = AuditWriter(redis, namespace, replica, key, key_id, **options)
    await writer.start()
    try:
        yield writer
    finally:
        await writer.close()


async def append_all(writer: AuditWriter, records: list[AuditRecord]) -> list[str]:
    """Append one at a time, in order."""
    return [await writer.append(r) for r in records]


def keys_of(key: str, key_id: str = "k1") -> AuditKeys:
    return AuditKeys({key_id: key}, key_id)


async def raw(redis: aioredis.Redis, stream: str) -> list[Entry]:
    return [(i.decode(), f) for i, f in as_page(await redis.xrange(stream))]


async def chain_entries(redis: aioredis.Redis, namespace: str, chain: str) -> list[Entry]:
    return await raw(redis, chain_key(namespace, chain))


async def rewrite(redis: aioredis.Redis, stream: str, entries: list[Entry]) -> None:
    """Replace ``stream`` with ``entries`` (ids kept as given): editing by rewriting."""
    await redis.delete(stream)
    for entry_id, fields in entries:
        await redis.xadd(stream, fields, id=entry_id)  # type: ignore[arg-type]


async def redis_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds * 1000 + micros // 1000)


async def next_ms(redis: aioredis.Redis) -> int:
    """Redis time once it has passed the current millisecond (stream ids are Redis time)."""
    mark = await redis_ms(redis)
    return int(await eventually(lambda: _later(redis, mark), interval=0.001))


async def _later(redis: aioredis.Redis, mark: int) -> int:
    now = await redis_ms(redis)
    return now if now > mark else 0


async def redrive_records(settings: Settings) -> list[AuditEntry]:
    """The gateway's redrive decisions in its audit trail, oldest first."""
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        reader = AuditReader(client, settings.namespace)
        return [e async for e in reader.entries() if e.record.stage == "redrive"]
    finally:
        await client.aclose()
